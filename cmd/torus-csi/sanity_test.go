package main

import (
	"context"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/kubernetes-csi/csi-test/v5/pkg/sanity"
	. "github.com/onsi/ginkgo/v2"
	"github.com/onsi/ginkgo/v2/types"
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
	checkSkips(t, func() {
		RegisterFailHandler(Fail)
		suite, reporter := GinkgoConfiguration()
		for s, why := range skipped {
			t.Logf("skipping sanity specs %q: %s", s, why)
			suite.SkipStrings = append(suite.SkipStrings, s)
		}
		RunSpecs(t, "torus-csi sanity", suite, reporter)
	})
	sc.Finalize()
}

// sanitySkips are the csi-sanity specs that skip themselves with this
// driver, by their skip message, each with why: the spec makes the
// capability optional and this driver does not advertise it. Any other
// skip fails the test.
var sanitySkips = map[string]string{
	"ControllerPublishVolume not supported":                     "no ControllerPublish: a volume attaches in NodeStage, under its attach lock (the one writer), so there is nothing to publish first",
	"ControllerUnpublishVolume not supported":                   "no ControllerPublish (above)",
	"Controller Publish, UnpublishVolume not supported":         "no ControllerPublish (above)",
	"Service does not have single node multi writer capability": "one writer per volume: SINGLE_NODE_MULTI_WRITER is not offered",
	"NodeGetStorageHealth not supported":                        "GET_STORAGE_HEALTH is optional; a storage node's health is torusctl health",
	"ControllerGetVolumeHealth not supported":                   "GET_VOLUME_HEALTH on the controller is optional; the node service reports a volume's health (NodeGetVolumeHealth)",
	"ControllerListVolumeHealth not supported":                  "LIST_VOLUMES health on the controller is optional; the node service reports a volume's health",
	"ControllerModifyVolume not supported":                      "MODIFY_VOLUME (VolumeAttributesClass) is optional; QoS limits change with torusctl volume set-qos",
	"Modify volume not supported":                               "MODIFY_VOLUME is optional (VolumeAttributesClass); QoS limits change with torusctl volume set-qos",
	"Modify Volume not supported":                               "MODIFY_VOLUME is optional (VolumeAttributesClass); QoS limits change with torusctl volume set-qos",
	"GetSnapshot not supported":                                 "GET_SNAPSHOT is optional; ListSnapshots with a snapshot id answers the same",
	"SNAPSHOT_ACCESSIBILITY_CONSTRAINTS not supported":          "every node reaches every snapshot: no topology",
	"GroupControllerService not supported":                      "the group controller (VolumeGroupSnapshots) is optional and not served; torusctl snapshot create --group takes group snapshots",
}

// checkSkips runs run (which runs the sanity specs) and fails t if a spec
// skipped itself for a reason sanitySkips does not list; it logs how many
// skipped for each listed one.
func checkSkips(t *testing.T, run func()) {
	var unexpected []string
	counts := map[string]int{}
	ReportAfterSuite("skips", func(r Report) {
		for _, s := range r.SpecReports {
			if s.State != types.SpecStateSkipped || s.Failure.Message == "" {
				continue // SkipStrings leave no message
			}
			msg := strings.TrimSpace(s.Failure.Message)
			if _, ok := sanitySkips[msg]; ok {
				counts[msg]++
				continue
			}
			unexpected = append(unexpected, s.FullText()+": "+msg)
		}
	})
	run()
	for msg, n := range counts {
		t.Logf("%d spec(s) skipped, %q: %s", n, msg, sanitySkips[msg])
	}
	if len(unexpected) > 0 {
		t.Errorf("specs skipped with no reason listed in sanitySkips:\n%s", strings.Join(unexpected, "\n"))
	}
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
