"""``shoal snapshotter``: containerd's snapshots service (containerd.services.snapshots.v1) over gRPC.

The ten RPCs map onto :class:`~shoal.snapshotter.service.Service`; Shoal errors map onto the gRPC
codes containerd turns back into its errdefs (NOT_FOUND, ALREADY_EXISTS, FAILED_PRECONDITION,
INVALID_ARGUMENT).  The generated stubs (``proto/``) come from scripts/gen_protos.py.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import empty_pb2, timestamp_pb2

from shoal.errors import NotFound, ShoalError, UsageError
from shoal.snapshotter.meta import FailedPrecondition, Snapshot, SnapshotExists
from shoal.snapshotter.proto import mount_pb2
from shoal.snapshotter.proto import snapshots_pb2 as pb
from shoal.snapshotter.service import Mount, Service

__all__ = ["SERVICE_NAME", "make_server", "serve"]

log = logging.getLogger(__name__)

SERVICE_NAME = "containerd.services.snapshots.v1.Snapshots"


def _code(e: ShoalError) -> Any:
    if isinstance(e, SnapshotExists):
        return grpc.StatusCode.ALREADY_EXISTS
    if isinstance(e, FailedPrecondition):
        return grpc.StatusCode.FAILED_PRECONDITION
    if isinstance(e, NotFound):
        return grpc.StatusCode.NOT_FOUND
    if isinstance(e, UsageError):
        return grpc.StatusCode.INVALID_ARGUMENT
    return grpc.StatusCode.UNKNOWN


def _mounts(ms: list[Mount]) -> list[mount_pb2.Mount]:
    return [mount_pb2.Mount(type=m.type, source=m.source, options=list(m.options)) for m in ms]


def _ts(t: float) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(int(t * 1e9))
    return ts


def _info(s: Snapshot) -> pb.Info:
    return pb.Info(name=s.key, parent=s.parent, kind=s.kind, labels=s.labels,  # type: ignore[arg-type]
                   created_at=_ts(s.created), updated_at=_ts(s.updated))


class _Handlers:
    def __init__(self, svc: Service) -> None:
        self.svc = svc

    def Prepare(self, req: pb.PrepareSnapshotRequest, ctx: Any) -> pb.PrepareSnapshotResponse:
        return pb.PrepareSnapshotResponse(mounts=_mounts(self.svc.prepare(req.key, req.parent, dict(req.labels))))

    def View(self, req: pb.ViewSnapshotRequest, ctx: Any) -> pb.ViewSnapshotResponse:
        return pb.ViewSnapshotResponse(mounts=_mounts(self.svc.view(req.key, req.parent, dict(req.labels))))

    def Mounts(self, req: pb.MountsRequest, ctx: Any) -> pb.MountsResponse:
        return pb.MountsResponse(mounts=_mounts(self.svc.mounts(req.key)))

    def Commit(self, req: pb.CommitSnapshotRequest, ctx: Any) -> empty_pb2.Empty:
        self.svc.commit(req.name, req.key, dict(req.labels))
        return empty_pb2.Empty()

    def Remove(self, req: pb.RemoveSnapshotRequest, ctx: Any) -> empty_pb2.Empty:
        self.svc.remove(req.key)
        return empty_pb2.Empty()

    def Stat(self, req: pb.StatSnapshotRequest, ctx: Any) -> pb.StatSnapshotResponse:
        return pb.StatSnapshotResponse(info=_info(self.svc.stat(req.key)))

    def Update(self, req: pb.UpdateSnapshotRequest, ctx: Any) -> pb.UpdateSnapshotResponse:
        s = self.svc.update(req.info.name, dict(req.info.labels), list(req.update_mask.paths))
        return pb.UpdateSnapshotResponse(info=_info(s))

    def List(self, req: pb.ListSnapshotsRequest, ctx: Any) -> Iterator[pb.ListSnapshotsResponse]:
        snaps = self.svc.list(list(req.filters))
        for i in range(0, len(snaps), 100):
            yield pb.ListSnapshotsResponse(info=[_info(s) for s in snaps[i:i + 100]])

    def Usage(self, req: pb.UsageRequest, ctx: Any) -> pb.UsageResponse:
        u = self.svc.usage(req.key)
        return pb.UsageResponse(size=u.size, inodes=u.inodes)

    def Cleanup(self, req: pb.CleanupRequest, ctx: Any) -> empty_pb2.Empty:
        self.svc.cleanup()
        return empty_pb2.Empty()


_RPCS: dict[str, tuple[Any, bool]] = {  # name -> (request type, server-streaming)
    "Prepare": (pb.PrepareSnapshotRequest, False), "View": (pb.ViewSnapshotRequest, False),
    "Mounts": (pb.MountsRequest, False), "Commit": (pb.CommitSnapshotRequest, False),
    "Remove": (pb.RemoveSnapshotRequest, False), "Stat": (pb.StatSnapshotRequest, False),
    "Update": (pb.UpdateSnapshotRequest, False), "List": (pb.ListSnapshotsRequest, True),
    "Usage": (pb.UsageRequest, False), "Cleanup": (pb.CleanupRequest, False),
}


def _wrap(name: str, fn: Callable[[Any, Any], Any], streaming: bool) -> Callable[[Any, Any], Any]:
    def call(req: Any, ctx: Any) -> Any:
        if log.isEnabledFor(logging.DEBUG):  # the text form of a request with labels is not free
            log.debug("%s %s", name, str(req).replace("\n", " "))
        try:
            if streaming:
                return list(fn(req, ctx))
            out = fn(req, ctx)
            log.debug("timeline: %s done", name)
            return out
        except ShoalError as e:
            log.debug("%s: %s", name, e)
            ctx.abort(_code(e), str(e))
        except Exception as e:  # a bug: report it to containerd as UNKNOWN, keep serving
            log.exception("%s failed", name)
            ctx.abort(grpc.StatusCode.UNKNOWN, f"{type(e).__name__}: {e}")

    if streaming:
        def stream(req: Any, ctx: Any) -> Iterator[Any]:
            yield from call(req, ctx)
        return stream
    return call


def make_server(svc: Service, address: str, extra: tuple[Any, ...] = (), workers: int = 8) -> Any:
    """The gRPC server of ``svc`` on the unix socket ``address``; ``extra`` generic handlers (the CRI
    image-service proxy) are served on the same socket."""
    h = _Handlers(svc)
    handlers = {}
    for name, (req_t, streaming) in _RPCS.items():
        fn = _wrap(name, getattr(h, name), streaming)
        make = grpc.unary_stream_rpc_method_handler if streaming else grpc.unary_unary_rpc_method_handler
        handlers[name] = make(fn, request_deserializer=req_t.FromString,
                              response_serializer=lambda m: m.SerializeToString())
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers), *extra))
    if os.path.exists(address):
        os.unlink(address)  # a stale socket of a previous run
    Path(address).parent.mkdir(parents=True, exist_ok=True)
    # root (containerd) only: the socket also carries CRI image calls and their credentials (criproxy)
    old = os.umask(0o177)
    try:
        server.add_insecure_port(f"unix://{os.path.abspath(address)}")
    finally:
        os.umask(old)
    _owner_only(address)
    return server


def _owner_only(address: str) -> None:
    """Mode 0600 on the socket, whatever the umask was when it was bound."""
    try:
        os.chmod(address, 0o600)
    except FileNotFoundError:  # bound when the server starts: serve() calls this again
        pass


def serve(svc: Service, address: str, ready: Callable[[], None] | None = None, extra: tuple[Any, ...] = (),
          workers: int = 8) -> None:
    """Serve until SIGTERM/SIGINT; the FUSE mounts of remote snapshots live on in their daemons."""
    server = make_server(svc, address, extra, workers)
    server.start()
    _owner_only(address)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    log.info("snapshotter serving on %s", address)
    if ready is not None:
        ready()
    stop.wait()
    server.stop(2).wait()
    svc.close()
