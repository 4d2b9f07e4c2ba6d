"""The containerd view of a Shoal image: the runtime view of ``shoal.format.runtime_view``
(docs/spec/oci-mapping.md §4), which ``shoal push`` publishes in the image index at the image's tag.
Kept under its first name for the snapshotter's readers."""

from __future__ import annotations

from shoal.format.runtime_view import STUB_MEDIA_TYPE, RuntimeView, runtime_view
from shoal.mediatypes import OCI_CONFIG, OCI_MANIFEST

__all__ = ["STUB_MEDIA_TYPE", "OCI_CONFIG", "OCI_MANIFEST", "ContainerdView", "containerd_view"]

ContainerdView = RuntimeView
containerd_view = runtime_view
