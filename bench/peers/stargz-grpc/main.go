// containerd-stargz-grpc for bench/containerd.py: the stargz snapshotter 0.12.0 daemon, wired by hand
// from the library sources Debian packages (golang-github-containerd-stargz-snapshotter-dev), because
// the library's service.NewStargzSnapshotterService imports k8s.io/cri-api, which bookworm lacks.
// It does what upstream's cmd/containerd-stargz-grpc does minus CRI/kubeconfig keychains, mirrors,
// IPFS and the bbolt metadata store (../shared/recipes/estargz-peer.md §2); it reads the layer sources
// from CRI's labels first, then from ctr-remote's, as upstream's service does.
// Built on demand by bench/containerd.py into /var/tmp (GOPATH mode, offline); never committed.
package main

import (
	"context"
	"flag"
	"fmt"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/BurntSushi/toml"
	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/contrib/snapshotservice"
	"github.com/containerd/containerd/log"
	"github.com/containerd/containerd/reference"
	"github.com/containerd/containerd/remotes/docker"
	"github.com/containerd/containerd/snapshots/overlay/overlayutils"
	stargzfs "github.com/containerd/stargz-snapshotter/fs"
	fsconfig "github.com/containerd/stargz-snapshotter/fs/config"
	"github.com/containerd/stargz-snapshotter/fs/layer"
	"github.com/containerd/stargz-snapshotter/fs/source"
	snbase "github.com/containerd/stargz-snapshotter/snapshot"
	rhttp "github.com/hashicorp/go-retryablehttp"
	digest "github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"github.com/sirupsen/logrus"
	"google.golang.org/grpc"
)

// hosts is resolver.RegistryHostsFromConfig with an empty config: https, plain http for localhost,
// anonymous auth, a 30 s timeout per request.
func hosts(ref reference.Spec) ([]docker.RegistryHost, error) {
	client := rhttp.NewClient()
	client.Logger = nil
	tr := client.StandardClient()
	tr.Timeout = 30 * time.Second
	h := docker.RegistryHost{
		Client:       tr,
		Host:         ref.Hostname(),
		Scheme:       "https",
		Path:         "/v2",
		Capabilities: docker.HostCapabilityPull | docker.HostCapabilityResolve,
		Authorizer:   docker.NewDockerAuthorizer(docker.WithAuthClient(tr)),
	}
	if localhost, _ := docker.MatchLocalhost(h.Host); localhost {
		h.Scheme = "http"
	}
	if h.Host == "docker.io" {
		h.Host = "registry-1.docker.io"
	}
	return []docker.RegistryHost{h}, nil
}

// fromCRILabels is upstream's service/cri.go sourceFromCRILabels (v0.12.0, Apache-2.0): the layer
// source from the labels containerd's CRI plugin sets with disable_snapshot_annotations = false.
func fromCRILabels(labels map[string]string) ([]source.Source, error) {
	refStr, ok := labels["containerd.io/snapshot/cri.image-ref"]
	if !ok {
		return nil, fmt.Errorf("reference hasn't been passed")
	}
	refspec, err := reference.Parse(refStr)
	if err != nil {
		return nil, err
	}
	digestStr, ok := labels["containerd.io/snapshot/cri.layer-digest"]
	if !ok {
		return nil, fmt.Errorf("digest hasn't been passed")
	}
	target, err := digest.Parse(digestStr)
	if err != nil {
		return nil, err
	}
	layers := []ocispec.Descriptor{{Digest: target}}
	if l, ok := labels["containerd.io/snapshot/cri.image-layers"]; ok {
		for _, s := range strings.Split(l, ",") {
			d, err := digest.Parse(s)
			if err != nil {
				return nil, err
			}
			if d != target {
				layers = append(layers, ocispec.Descriptor{Digest: d})
			}
		}
	}
	return []source.Source{{Hosts: hosts, Name: refspec, Target: ocispec.Descriptor{Digest: target},
		Manifest: ocispec.Manifest{Layers: layers}}}, nil
}

// sources tries CRI's labels, then ctr-remote's (upstream's service.sources).
func sources(labels map[string]string) ([]source.Source, error) {
	src, err := fromCRILabels(labels)
	if err == nil {
		return src, nil
	}
	src, err2 := source.FromDefaultLabels(hosts)(labels)
	if err2 == nil {
		return src, nil
	}
	return nil, fmt.Errorf("no layer source: %v; %v", err, err2)
}

func main() {
	address := flag.String("address", "/run/containerd-stargz-grpc/containerd-stargz-grpc.sock", "gRPC socket")
	root := flag.String("root", "/var/lib/containerd-stargz-grpc", "state directory")
	configPath := flag.String("config", "", "TOML file (fs/config.Config keys, e.g. no_background_fetch)")
	logLevel := flag.String("log-level", "info", "logrus level")
	flag.Parse()

	lvl, err := logrus.ParseLevel(*logLevel)
	if err != nil {
		logrus.WithError(err).Fatal("bad --log-level")
	}
	logrus.SetLevel(lvl)
	logrus.SetFormatter(&logrus.JSONFormatter{TimestampFormat: log.RFC3339NanoFixed})
	ctx := log.WithLogger(context.Background(), log.L)

	var cfg fsconfig.Config
	if *configPath != "" {
		if _, err := os.Stat(*configPath); err == nil {
			if _, err := toml.DecodeFile(*configPath, &cfg); err != nil {
				log.G(ctx).WithError(err).Fatal("bad config")
			}
		}
	}

	snRoot := filepath.Join(*root, "snapshotter")
	if err := os.MkdirAll(snRoot, 0700); err != nil {
		log.G(ctx).WithError(err).Fatal("mkdir root")
	}
	opq := layer.OverlayOpaqueTrusted
	if userxattr, err := overlayutils.NeedsUserXAttr(snRoot); err != nil {
		log.G(ctx).WithError(err).Warn("cannot detect userxattr; assuming trusted")
	} else if userxattr {
		opq = layer.OverlayOpaqueUser
	}
	fs, err := stargzfs.NewFilesystem(filepath.Join(*root, "stargz"), cfg,
		stargzfs.WithGetSources(sources), stargzfs.WithOverlayOpaqueType(opq))
	if err != nil {
		log.G(ctx).WithError(err).Fatal("filesystem")
	}
	sn, err := snbase.NewSnapshotter(ctx, snRoot, fs, snbase.AsynchronousRemove)
	if err != nil {
		log.G(ctx).WithError(err).Fatal("snapshotter")
	}

	srv := grpc.NewServer()
	snapshotsapi.RegisterSnapshotsServer(srv, snapshotservice.FromSnapshotter(sn))
	if err := os.MkdirAll(filepath.Dir(*address), 0700); err != nil {
		log.G(ctx).WithError(err).Fatal("mkdir socket dir")
	}
	_ = os.Remove(*address)
	l, err := net.Listen("unix", *address)
	if err != nil {
		log.G(ctx).WithError(err).Fatal("listen")
	}
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM)
	go func() {
		<-sig
		srv.Stop()
	}()
	log.G(ctx).WithField("address", *address).Info("serving")
	if err := srv.Serve(l); err != nil {
		log.G(ctx).WithError(err).Error("serve")
	}
	if err := sn.Close(); err != nil {
		log.G(ctx).WithError(err).Warn("close")
	}
}
