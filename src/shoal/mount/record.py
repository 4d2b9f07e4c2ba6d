"""``shoal profile``: run a workload on a lazy mount, record the frames it reads first, save the profile
(docs/spec/mount.md §6) and its bundle (docs/spec/bundle.md: the tree it used and the chunks it read).
Above ``run`` (and so above the daemon); ``profile`` holds the data, the
storage and the ``RecordingSource`` the daemon uses, and imports nothing from here.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shoal.errors import ShoalError
from shoal.mount import bundle
from shoal.mount import run as mrun
from shoal.mount import state as ms
from shoal.mount.image import open_image
from shoal.mount.profile import Profile, push_remote, read_recording, save_local
from shoal.store import Store
from shoal.transports.base import parse_reference

__all__ = ["ProfileResult", "record"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProfileResult:
    profile: Profile
    exit_code: int  # the workload's (124 if it was stopped after --seconds)
    local: str  # where the profile was saved
    pushed: str | None = None  # the referrer artifact's digest, for docker:// images
    frame_bytes_total: int = 0  # compressed bytes of the whole image
    notes: list[str] = field(default_factory=list)
    bundle_bytes: int = 0  # the profile bundle (docs/spec/bundle.md), saved and pushed beside the profile
    bundle_chunks: int = 0
    bundle_data_bytes: int = 0  # its chunks, uncompressed


def record(ref: str, seconds: float, run_opts: Any, open_opts: Any, store_root: Any = None,
           push: bool = True) -> ProfileResult:
    """Run ``run_opts.command`` (or the image's) on a lazy mount of ``ref`` for at most ``seconds``,
    record the frames it read, save the profile locally and, for ``docker://`` references, push it."""
    image = open_image(ref, store_root, dataclasses.replace(open_opts, profile=False))
    rec_dir = ms.run_dir() / "profiles"
    rec_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    rec = str(rec_dir / f"{secrets.token_hex(8)}.json")
    opts = dataclasses.replace(run_opts, rm=True, prefetch="none", timeout=seconds, record_to=rec)
    t0 = time.monotonic()
    try:
        code = mrun.run_image(image, opts)
        recording = read_recording(rec)
    finally:
        Path(rec).unlink(missing_ok=True)
    elapsed = time.monotonic() - t0
    idx = image.index
    prof = Profile.of_frames(image.digest, idx, recording.frames, elapsed,
                             tuple(opts.command) if opts.command else ())
    # the bundle: its chunks come from where the workload's reads put them (the store), verified again
    t1 = time.monotonic()
    blob = bundle.build(idx, recording, image.source)
    opened = bundle.check(blob, "sha256:" + idx.root.hex(), image.digest)
    if opened is None:  # cannot happen: made from the verified index and chunks
        raise ShoalError("the profile bundle just made does not check against its image")
    log.info("profile bundle of %s: %d bytes (%d chunks, %d bytes) in %.1fs", image.digest, len(blob),
             len(opened.chunks), opened.data_bytes, time.monotonic() - t1)
    root = Store.open(None if store_root is None else os.path.abspath(os.fspath(store_root))).root
    path = save_local(root, prof)
    bundle.save_local(root, prof.image, blob)
    pushed = None
    if push and parse_reference(ref).transport.name == "docker":
        pushed = push_remote(ref, open_opts.context, prof, blob)
    total = sum(f.clen for f in idx.frames)
    log.info("profile of %s: %d frames, %d of %d bytes", image.digest, len(recording.frames), prof.nbytes, total)
    return ProfileResult(prof, code, str(path), pushed, total, bundle_bytes=len(blob),
                         bundle_chunks=len(opened.chunks), bundle_data_bytes=opened.data_bytes)
