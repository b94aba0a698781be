package main

import (
	"context"
	"log/slog"
	"os"
	"path/filepath"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/kubernetes-csi/csi-test/v5/pkg/sanity"
	. "github.com/onsi/ginkgo/v2"
	. "github.com/onsi/gomega"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/torus-storage/torus/internal/testcluster"
)

// skipped are the sanity specs this test does not run, each with why.
var skipped = map[string]string{
	// The node service (NodeStage and the rest) attaches real devices: its
	// sanity run is in the VM.
	"Node Service": "needs ublk or kernel NBD devices: run in the VM",
}

// TestSanity runs csi-sanity's Identity and Controller specs against the
// controller on a real (embedded) etcd with an initialised cluster.
func TestSanity(t *testing.T) {
	quiet := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	c := testcluster.NewCluster(t, testcluster.Options{Replication: 2, Logger: quiet})
	sock := filepath.Join(t.TempDir(), "csi.sock")
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	// csi-sanity asks the node service for its capabilities when it cleans
	// up after every spec; here a node service with none answers (it
	// stages nothing, and nothing is published in these specs).
	svc := services{
		identity:   &identity{ms: c.Meta, version: "test", controller: true},
		controller: &controller{ms: c.Meta},
		node:       noNodeServer{},
	}
	go func() { done <- serve(ctx, sock, svc, quiet) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("serve: %v", err)
		}
	})
	cfg := sanity.NewTestConfig()
	cfg.Address = "unix:" + sock
	cfg.TestVolumeSize = 64 << 20
	cfg.TestVolumeExpandSize = 128 << 20
	cfg.TargetPath = filepath.Join(t.TempDir(), "target")
	cfg.StagingPath = filepath.Join(t.TempDir(), "staging")
	sc := sanity.GinkgoTest(&cfg)
	RegisterFailHandler(Fail)
	suite, reporter := GinkgoConfiguration()
	for s, why := range skipped {
		t.Logf("skipping sanity specs %q: %s", s, why)
		suite.SkipStrings = append(suite.SkipStrings, s)
	}
	RunSpecs(t, "torus-csi sanity", suite, reporter)
	sc.Finalize()
}

// noNodeServer is a node service with no capabilities.
type noNodeServer struct{ csi.UnimplementedNodeServer }

func (noNodeServer) NodeGetCapabilities(context.Context, *csi.NodeGetCapabilitiesRequest) (*csi.NodeGetCapabilitiesResponse, error) {
	return &csi.NodeGetCapabilitiesResponse{}, nil
}

// NodeUnpublishVolume: nothing is published here.
func (noNodeServer) NodeUnpublishVolume(context.Context, *csi.NodeUnpublishVolumeRequest) (*csi.NodeUnpublishVolumeResponse, error) {
	return &csi.NodeUnpublishVolumeResponse{}, nil
}

// NodeUnstageVolume: nothing is staged here.
func (noNodeServer) NodeUnstageVolume(context.Context, *csi.NodeUnstageVolumeRequest) (*csi.NodeUnstageVolumeResponse, error) {
	return &csi.NodeUnstageVolumeResponse{}, nil
}

// TestParameters checks CreateVolume's parameters: each known one parsed,
// bad values and unknown names refused with INVALID_ARGUMENT.
func TestParameters(t *testing.T) {
	repl, q, err := parseParameters(map[string]string{"replication": "2", "readIOPS": "500", "writeIOPS": "200",
		"readBPS": "100MiB", "writeBPS": "1048576", "burst": "1s"})
	if err != nil || repl != 2 || q.ReadIOPS != 500 || q.WriteIOPS != 200 || q.ReadBPS != 100<<20 || q.WriteBPS != 1<<20 || q.BurstMS != 1000 {
		t.Fatalf("parseParameters: %d %+v %v", repl, q, err)
	}
	for _, bad := range []map[string]string{
		{"replication": "0"}, {"replication": "x"}, {"readIOPS": "-1"}, {"readBPS": "lots"}, {"burst": "-1s"},
		{"burst": "1h"}, {"writeBPS": "1"}, {"fsType": "ext4"},
	} {
		if _, _, err := parseParameters(bad); status.Code(err) != codes.InvalidArgument {
			t.Errorf("parseParameters(%v): %v, want INVALID_ARGUMENT", bad, err)
		} else {
			t.Logf("%v: %v", bad, err)
		}
	}
}
