"""Transports with skopeo's syntax: docker://, oci:, oci-archive:, docker-archive:, dir:, and bare NAME:TAG
for the local store.  Each registers itself when its module is imported; ``base.parse_reference`` and
``base.transport_named`` import a built-in one on first use, ``base.all_transports()`` loads them all."""
