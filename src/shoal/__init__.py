"""Shoal: chunked, deduplicated, lazily mountable container images on OCI registries."""

__version__ = "0.1.0"
FORMAT_VERSION = 1
