"""Classic OCI/Docker images to Shoal and back (docs/spec/convert.md).

- ``convert(source, store, ref)``: any ImageSource (oci:, docker://, archives) -> a Shoal image.
- ``export(store, ref, dest)``: a Shoal image -> a classic one-layer OCI image, byte-reproducible.
- ``LayerApplier``: apply classic tar layers to an in-memory tree (a ``build.TreeSource``).
"""

from shoal.convert.exporter import ExportedImage, ExportResult, export, export_to_layout
from shoal.convert.importer import ConvertResult, PlatformResult, convert
from shoal.convert.layers import LayerApplier, LayerResult
from shoal.convert.platforms import Platform, resolve_images
from shoal.convert.stream import ConvertLimits

__all__ = ["convert", "ConvertResult", "PlatformResult", "export", "export_to_layout", "ExportResult",
           "ExportedImage", "LayerApplier", "LayerResult", "ConvertLimits", "Platform", "resolve_images"]
