"""Software bills of materials: package databases read from an image without unpacking it (docs/sbom.md)."""
