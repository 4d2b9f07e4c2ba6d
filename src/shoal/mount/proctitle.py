"""Keep secrets given on the command line out of ``/proc/PID/cmdline`` (``ps``) for a process's life.

Python copies ``argv`` at start-up, but the kernel keeps showing the original argument area of
the process's stack (``mm->arg_start .. arg_end``) to anyone who reads ``/proc/PID/cmdline``, and
a forked mount daemon inherits that area.  :func:`scrub_argv` rewrites it in place, as
setproctitle(3) does: the addresses are fields 48 and 49 of ``/proc/self/stat`` (proc(5), Linux
3.5+), and the process writes its own memory through ``/proc/self/mem`` (no privilege needed).
The value of each secret-bearing option is masked (``--creds alice:***``); the arguments keep their
order and the area its length (the freed tail is NUL bytes).

Best effort: where ``/proc`` is missing or refuses the write, nothing changes and ``False`` comes
back; a secret is better given on standard input (``--creds USER`` reads the password there, or
asks for it on a terminal).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

__all__ = ["CREDS_OPTIONS", "PASSWORD_OPTIONS", "mask_args", "scrub_argv", "set_title"]

log = logging.getLogger(__name__)

CREDS_OPTIONS = ("--creds", "--src-creds", "--dest-creds")  # USER[:PASS]: the part after ':' is secret
PASSWORD_OPTIONS = ("--password",)  # the whole value is secret
_MASK = "***"


def _hide(secret: str) -> str:
    return _MASK[:len(secret)]  # never longer than the secret: the area cannot grow


def _mask_creds(value: str) -> str:
    user, sep, secret = value.partition(":")
    return f"{user}:{_hide(secret)}" if sep else value


def _mask_password(value: str) -> str:
    return _hide(value)


def mask_args(args: Sequence[str], creds: Sequence[str] = CREDS_OPTIONS,
              passwords: Sequence[str] = PASSWORD_OPTIONS) -> list[str]:
    """``args`` with the values of the ``creds`` options (``USER:PASS``) and ``passwords`` options
    masked, in every spelling getopt and click accept: ``--opt VALUE``, ``--opt=VALUE``, ``-pVALUE``."""
    masks = {o: _mask_creds for o in creds} | {o: _mask_password for o in passwords}
    out: list[str] = []
    pending = None
    for i, arg in enumerate(args):
        if pending is not None:
            out.append(pending(arg))
            pending = None
            continue
        if arg == "--":  # the rest are operands
            out.extend(args[i:])
            break
        masked = arg
        for opt, fn in masks.items():
            if arg == opt:
                pending = fn
            elif opt.startswith("--") and arg.startswith(opt + "="):
                masked = opt + "=" + fn(arg[len(opt) + 1:])
            elif not opt.startswith("--") and len(opt) == 2 and arg.startswith(opt) and len(arg) > 2:
                masked = opt + fn(arg[2:])
        out.append(masked)
    return out


def _arg_area() -> tuple[int, int]:
    with open("/proc/self/stat", "rb") as f:
        stat = f.read()
    fields = stat[stat.rindex(b")") + 2:].split()  # fields[0] is field 3 (state): comm may hold spaces
    return int(fields[48 - 3]), int(fields[49 - 3])


def scrub_argv(creds: Sequence[str] = CREDS_OPTIONS, passwords: Sequence[str] = PASSWORD_OPTIONS) -> bool:
    """Mask the secret option values of this process's ``/proc/self/cmdline`` in place (see the
    module text).  ``True`` if something was masked; never raises."""
    try:
        start, end = _arg_area()
        if not 0 < start < end:
            return False
        with open("/proc/self/mem", "r+b", buffering=0) as mem:
            mem.seek(start)
            area = mem.read(end - start)
            with open("/proc/self/cmdline", "rb") as f:
                if f.read() != area:  # someone already rewrote it (setproctitle): leave it alone
                    return False
            # the area's NUL tail (a fork server's padding, set_title: ~4 KiB) holds nothing to mask;
            # split, each of its bytes would be an argument for mask_args (4-5 ms in a mount daemon)
            raw = area.rstrip(b"\0").split(b"\0")
            args = [a.decode("utf-8", "surrogateescape") for a in raw]
            masked = mask_args(args, creds, passwords)
            if masked == args:
                return False
            new = b"\0".join(a.encode("utf-8", "surrogateescape") for a in masked) + b"\0"
            if len(new) > len(area):  # pragma: no cover - a mask is never longer than what it replaces
                return False
            mem.seek(start)
            mem.write(new.ljust(len(area), b"\0"))
        return True
    except (OSError, ValueError, IndexError) as exc:
        log.debug("cannot hide secrets in the command line: %s", exc)
        return False


def set_title(args: Sequence[str]) -> bool:
    """Show ``args`` (secrets masked) as this process's command line, in the argument area it has
    (a fork server pads its own for its children, snapshotter/forkserver.py); cut at the area's end.
    ``True`` if written; never raises."""
    try:
        start, end = _arg_area()
        if not 0 < start < end:
            return False
        new = b"\0".join(a.encode("utf-8", "surrogateescape") for a in mask_args(list(args))) + b"\0"
        new = new[:end - start - 1] + b"\0" if len(new) > end - start else new
        with open("/proc/self/mem", "r+b", buffering=0) as mem:
            mem.seek(start)
            mem.write(new.ljust(end - start, b"\0"))
        return True
    except (OSError, ValueError, IndexError) as exc:
        log.debug("cannot set the command line: %s", exc)
        return False
