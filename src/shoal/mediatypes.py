"""Media types and annotation keys (docs/spec/oci-mapping.md).  Leaf module."""

from __future__ import annotations

# Shoal's own types: never vnd.oci.* for Shoal content (spec: oci-mapping.md §2).
ARTIFACT_TYPE = "application/vnd.shoal.image.v1"
CONFIG = "application/vnd.shoal.config.v1+json"
INDEX = "application/vnd.shoal.index.v1+cbor+zstd"
PACK = "application/vnd.shoal.pack.v1+zstd"
PROFILE = "application/vnd.shoal.profile.v1+json"
BUNDLE = "application/vnd.shoal.bundle.v1"  # a profile bundle (docs/spec/bundle.md)

# OCI and Docker types we read and write.
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
OCI_EMPTY = "application/vnd.oci.empty.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
# cosign's signature payload layer (the ``sha256-<hex>.sig`` attachment; docs/spec/trust.md §2)
COSIGN_SIGNATURE = "application/vnd.dev.cosign.simplesigning.v1+json"

MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)

# Annotations.
ANN_FORMAT = "dev.shoal.format"
ANN_ROOT = "dev.shoal.root"
ANN_REF_NAME = "org.opencontainers.image.ref.name"
ANN_CREATED = "org.opencontainers.image.created"
ANN_PROFILE_BLOB = "dev.shoal.profile.blob"  # a profile artifact's layer, sha256:<hex>:<size> (mount.md §6)
ANN_BUNDLE_BLOB = "dev.shoal.bundle.blob"  # its bundle layer, sha256:<hex>:<size> (bundle.md §5)
