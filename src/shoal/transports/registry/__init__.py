"""OCI distribution-spec registry transport: client, auth and credentials."""

from __future__ import annotations

from .auth import Authenticator, Challenge, parse_www_authenticate
from .blobs import BlobReader
from .client import (
    DEFAULT_MANIFEST_ACCEPT,
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    MAX_MANIFEST_SIZE,
    OCI_INDEX,
    OCI_MANIFEST,
    ManifestInfo,
    RegistryClient,
    RegistryStats,
    referrers_tag,
)
from .credentials import (
    Credentials,
    default_auth_file,
    erase_credentials,
    load_credentials,
    store_credentials,
)
from .uploads import PutBlobResult

__all__ = [
    "Authenticator",
    "BlobReader",
    "Challenge",
    "Credentials",
    "DEFAULT_MANIFEST_ACCEPT",
    "DOCKER_MANIFEST",
    "DOCKER_MANIFEST_LIST",
    "MAX_MANIFEST_SIZE",
    "ManifestInfo",
    "OCI_INDEX",
    "OCI_MANIFEST",
    "PutBlobResult",
    "RegistryClient",
    "RegistryStats",
    "default_auth_file",
    "erase_credentials",
    "load_credentials",
    "parse_www_authenticate",
    "referrers_tag",
    "store_credentials",
]
