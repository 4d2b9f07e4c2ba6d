"""The CRI image-service proxy: ``runtime.v1.ImageService`` on the snapshotter's socket, forwarded to
containerd's CRI socket, recording the credentials of each PullImage (docs/containerd.md "Credentials").

Every call of the service is forwarded as raw bytes (request, response, status code and message,
deadline, metadata), so the proxy needs no stubs and passes on fields it does not know; only a
PullImage request is also decoded (``proto/cri_api.proto``) to hand ``image.image`` and ``auth`` to
the :class:`~shoal.snapshotter.keychain.Keychain` *before* it is forwarded: containerd's pull
Prepares the layers on this same server, whose lazy mounts then find the credentials.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from shoal.snapshotter.keychain import Keychain, auth_from_cri
from shoal.snapshotter.proto import cri_api_pb2

__all__ = ["IMAGE_SERVICE", "MAX_PULLS", "ImageServiceProxy"]

log = logging.getLogger(__name__)

IMAGE_SERVICE = "runtime.v1.ImageService"
MAX_PULLS = 16  # forwarded PullImage calls at once; the server keeps threads for containerd's Prepares
_HOP_BY_HOP = ("user-agent", "grpc-", ":")
_NO_DEADLINE = 86400.0 * 365
_KNOWN = frozenset({"ListImages", "ImageStatus", "PullImage", "RemoveImage", "ImageFsInfo"})  # CRI v1


def _raw(b: bytes) -> bytes:
    return b


class ImageServiceProxy(grpc.GenericRpcHandler):  # type: ignore[misc]
    """Serves every method of ``runtime.v1.ImageService`` by forwarding it to ``target`` (a unix socket)."""

    def __init__(self, target: str, keychain: Keychain) -> None:
        self.keychain = keychain
        self.channel = grpc.insecure_channel(f"unix://{target}")
        self._pulls = threading.BoundedSemaphore(MAX_PULLS)
        self._handlers: dict[str, Any] = {}

    def service(self, details: Any) -> Any:
        method = str(details.method)
        if not method.startswith(f"/{IMAGE_SERVICE}/"):
            return None
        handler = self._handlers.get(method)
        if handler is None:
            handler = grpc.unary_unary_rpc_method_handler(self._forwarder(method), request_deserializer=_raw,
                                                          response_serializer=_raw)
            if method.rpartition("/")[2] in _KNOWN:  # cached for CRI's own methods only: names a client
                self._handlers[method] = handler     # makes up cost nothing that stays
        return handler

    def _forwarder(self, method: str) -> Callable[[bytes, Any], bytes]:
        call = self.channel.unary_unary(method, request_serializer=_raw, response_deserializer=_raw)
        pull = method.endswith("/PullImage")

        def forward(req: bytes, ctx: Any) -> bytes:
            md = [(k, v) for k, v in ctx.invocation_metadata() if not k.startswith(_HOP_BY_HOP)]
            try:
                left = ctx.time_remaining()  # "infinite" without a deadline, which the channel would misread
                resp: bytes = call(req, timeout=left if left < _NO_DEADLINE else None, metadata=md)
                return resp
            except grpc.RpcError as e:
                ctx.abort(e.code(), e.details() or "")
                raise  # not reached: abort raises

        def forward_pull(req: bytes, ctx: Any) -> bytes:
            if not self._pulls.acquire(blocking=False):
                ctx.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"more than {MAX_PULLS} image pulls at once")
            try:
                undo = self._record(req)
                try:
                    return forward(req, ctx)
                except BaseException:
                    if undo is not None:
                        undo()
                    raise
            finally:
                self._pulls.release()

        return forward_pull if pull else forward

    def _record(self, req: bytes) -> Callable[[], None] | None:
        """Keep the credentials of a PullImage request; returns how to undo that if the pull fails."""
        try:
            pr = cri_api_pb2.PullImageRequest.FromString(req)
        except DecodeError:
            return None  # containerd answers it with the proper error
        a, image = pr.auth, pr.image.image
        if not pr.HasField("auth") or not image:
            return None
        creds = auth_from_cri(image, a.username, a.password, a.auth, a.server_address, a.identity_token,
                              a.registry_token)
        if creds is None:
            return None
        old = self.keychain.entry_for(image)
        _saving(lambda: self.keychain.record(image, creds))
        return lambda: _saving(lambda: self.keychain.revert(image, creds, old))

    def close(self) -> None:
        self.channel.close()


def _saving(fn: Callable[[], object]) -> None:
    """Run a keychain update; a file that cannot be written is logged (memory is updated all the same)."""
    try:
        fn()
    except OSError as e:
        log.warning("CRI keychain: cannot save credentials (%s); lazy mounts after a restart will not have "
                    "them", e.strerror)
