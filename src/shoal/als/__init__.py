"""podman / CRI-O additional layer store over lazy Shoal mounts (docs/podman.md)."""
