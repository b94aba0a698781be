package main

import (
	"context"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/torus-storage/torus/meta"
)

// identity serves the Identity service of every mode.
type identity struct {
	csi.UnimplementedIdentityServer
	ms      *meta.Client
	version string
	// controller: this process serves the Controller service too.
	controller bool
}

// GetPluginInfo implements csi.IdentityServer.
func (i *identity) GetPluginInfo(context.Context, *csi.GetPluginInfoRequest) (*csi.GetPluginInfoResponse, error) {
	return &csi.GetPluginInfoResponse{Name: driverName, VendorVersion: i.version}, nil
}

// GetPluginCapabilities implements csi.IdentityServer: the Controller
// service where it is served, and online expansion (a mounted filesystem
// grows with its volume).
func (i *identity) GetPluginCapabilities(context.Context, *csi.GetPluginCapabilitiesRequest) (*csi.GetPluginCapabilitiesResponse, error) {
	exp := &csi.PluginCapability{Type: &csi.PluginCapability_VolumeExpansion_{
		VolumeExpansion: &csi.PluginCapability_VolumeExpansion{Type: csi.PluginCapability_VolumeExpansion_ONLINE}}}
	caps := []*csi.PluginCapability{exp}
	if i.controller {
		caps = append(caps, &csi.PluginCapability{Type: &csi.PluginCapability_Service_{
			Service: &csi.PluginCapability_Service{Type: csi.PluginCapability_Service_CONTROLLER_SERVICE}}})
	}
	return &csi.GetPluginCapabilitiesResponse{Capabilities: caps}, nil
}

// Probe implements csi.IdentityServer: ready when etcd answers.
func (i *identity) Probe(ctx context.Context, _ *csi.ProbeRequest) (*csi.ProbeResponse, error) {
	if _, err := i.ms.Config(ctx); err != nil {
		return nil, status.Errorf(codes.Unavailable, "etcd: %v", err)
	}
	return &csi.ProbeResponse{}, nil
}
