"""Time budgets of registry requests, enforced on the socket (docs/transports-registry.md §Deadlines).

httpx's timeouts bound each socket operation, so a server that sends one byte a second never trips
them.  Each request therefore gets a :class:`Deadline`: a budget of seconds it may spend *blocked on
the network*, ``base + bytes moved / min_rate`` (an honest transfer earns time as it goes, a trickle
does not), charged by :class:`DeadlineBackend`'s streams on every connect, read and write.  Time the
caller spends elsewhere (writing a blob to disk) is not charged, so a slow consumer never fails a
fast server.  The deadline is made active for the calling thread (``with deadline.active():``)
around the send and around every read of the body.
"""

from __future__ import annotations

import threading
import time
import typing
from collections.abc import Iterator
from contextlib import contextmanager

import httpcore

__all__ = ["Deadline", "DeadlineBackend", "DEFAULT_MIN_RATE"]

DEFAULT_MIN_RATE = 64 * 1024  # bytes/s: a body slower than this on average fails (about 0.5 Mbit/s)

_local = threading.local()


class Deadline:
    """The network time one request may take: ``base`` seconds plus one second per ``min_rate`` bytes
    it has moved so far (so a transfer must average ``min_rate`` after a grace of ``base``)."""

    def __init__(self, base: float, min_rate: float) -> None:
        self.base, self.min_rate = base, max(1.0, min_rate)
        self.moved = self.received = 0
        self.spent = 0.0

    @property
    def budget(self) -> float:
        return self.base + self.moved / self.min_rate

    def remaining(self) -> float:
        return self.budget - self.spent

    @property
    def expired(self) -> bool:
        return self.spent >= self.budget

    def charge(self, seconds: float, nbytes: int, received: bool = False) -> None:
        self.spent += seconds
        self.moved += nbytes
        if received:
            self.received += nbytes

    @contextmanager
    def active(self) -> Iterator[Deadline]:
        prev = getattr(_local, "deadline", None)
        _local.deadline = self
        try:
            yield self
        finally:
            _local.deadline = prev


def current() -> Deadline | None:
    return typing.cast("Deadline | None", getattr(_local, "deadline", None))


def _bounded(timeout: float | None, exc: type[Exception]) -> tuple[Deadline | None, float | None]:
    d = current()
    if d is None:
        return None, timeout
    left = d.remaining()
    if left <= 0:
        raise exc("request deadline exceeded")
    return d, left if timeout is None else min(timeout, left)


class _Stream(httpcore.NetworkStream):
    def __init__(self, inner: httpcore.NetworkStream) -> None:
        self._inner = inner

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        d, timeout = _bounded(timeout, httpcore.ReadTimeout)
        t0 = time.monotonic()
        data = b""
        try:
            data = self._inner.read(max_bytes, timeout)
            return data
        finally:
            if d is not None:
                d.charge(time.monotonic() - t0, len(data), received=True)

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        d, timeout = _bounded(timeout, httpcore.WriteTimeout)
        t0 = time.monotonic()
        done = 0
        try:
            self._inner.write(buffer, timeout)
            done = len(buffer)
        finally:
            if d is not None:
                d.charge(time.monotonic() - t0, done)

    def close(self) -> None:
        self._inner.close()

    def start_tls(self, ssl_context: typing.Any, server_hostname: str | None = None,
                  timeout: float | None = None) -> httpcore.NetworkStream:
        d, timeout = _bounded(timeout, httpcore.ConnectTimeout)
        t0 = time.monotonic()
        try:
            return _Stream(self._inner.start_tls(ssl_context, server_hostname, timeout))
        finally:
            if d is not None:
                d.charge(time.monotonic() - t0, 0)

    def get_extra_info(self, info: str) -> typing.Any:
        return self._inner.get_extra_info(info)


class DeadlineBackend(httpcore.NetworkBackend):
    """httpcore's sync backend, with every socket operation bounded by the thread's active Deadline."""

    def __init__(self) -> None:
        self._inner = httpcore.SyncBackend()

    def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                    socket_options: typing.Iterable[typing.Any] | None = None) -> httpcore.NetworkStream:
        d, timeout = _bounded(timeout, httpcore.ConnectTimeout)
        t0 = time.monotonic()
        try:
            return _Stream(self._inner.connect_tcp(host, port, timeout, local_address, socket_options))
        finally:
            if d is not None:
                d.charge(time.monotonic() - t0, 0)

    def connect_unix_socket(self, path: str, timeout: float | None = None,
                            socket_options: typing.Iterable[typing.Any] | None = None) -> httpcore.NetworkStream:
        return _Stream(self._inner.connect_unix_socket(path, timeout, socket_options))

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)
