"""GPG "simple signing" (containers/image's signedBy, skopeo's ``--sign-by``; docs/spec/trust.md §2.1).

A signature is an OpenPGP signed message (binary, what ``gpg --sign`` writes) whose literal data is the
simple-signing payload ``{"critical": {"identity": {"docker-reference": R}, "image":
{"docker-manifest-digest": D}, "type": "atomic container signature"}, "optional": {"creator": C,
"timestamp": T}}``.  OpenPGP is never parsed here: the real ``gpg`` binary signs (with the user's keyring,
``$GNUPGHOME``, as skopeo's gpgme) and verifies, in a temporary GNUPGHOME holding only the policy's keys
(as containers/image's ephemeral gpgme context), read through ``--status-fd``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass

from shoal import digest as dg
from shoal.errors import FormatError, UsageError
from shoal.trust.cosign import MAX_PAYLOAD, Payload, parse_payload

__all__ = ["SIMPLE_TYPE", "make_simple_payload", "parse_simple_payload", "gpg_sign", "check_secret_key",
           "Keyring"]

SIMPLE_TYPE = "atomic container signature"
CREATOR = "shoal"
_TIMEOUT = 60.0  # seconds one gpg run may take
_GPG_BASE = ["--batch", "--no-tty", "--no-greeting", "--no-permission-warning"]
# verification must never reach out (key servers, WKD) nor start an agent
_GPG_VERIFY = ["--no-autostart", "--no-auto-key-retrieve", "--no-auto-key-locate", "--trust-model", "always"]


def _gpg() -> str:
    exe = shutil.which("gpg")
    if exe is None:
        raise UsageError("GPG simple signing needs the gpg binary (Debian: apt-get install gnupg)")
    return exe


def make_simple_payload(manifest_digest: str, docker_reference: str, timestamp: int | None = None) -> bytes:
    """The payload containers/image signs: Go's json.Marshal of maps (sorted keys, no spaces)."""
    dg.validate(manifest_digest)
    doc = {"critical": {"identity": {"docker-reference": docker_reference},
                        "image": {"docker-manifest-digest": manifest_digest}, "type": SIMPLE_TYPE},
           "optional": {"creator": CREATOR, "timestamp": int(time.time()) if timestamp is None else timestamp}}
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def parse_simple_payload(raw: bytes) -> Payload:
    """As containers/image's untrustedSignature: exactly ``critical`` and ``optional`` (an object), the
    ``critical`` fields exactly, ``type`` "atomic container signature"."""
    return parse_payload(raw, SIMPLE_TYPE, optional_null=False)


def _status(text: bytes) -> list[list[str]]:
    out = []
    for line in text.decode("utf-8", "replace").splitlines():
        if line.startswith("[GNUPG:] "):
            out.append(line[9:].split(" "))
    return out


def gpg_sign(payload: bytes, fingerprint: str, passphrase_file: str | None = None) -> bytes:
    """``payload`` signed by the secret key ``fingerprint`` of the user's keyring (``$GNUPGHOME``): an
    opaque binary OpenPGP message, as gpgme's SigModeNormal."""
    cmd = [_gpg(), *_GPG_BASE, "--status-fd", "2", "--no-armor", "--local-user", fingerprint, "--output", "-",
           "--sign"]
    if passphrase_file:
        cmd[1:1] = ["--pinentry-mode", "loopback", "--passphrase-file", passphrase_file]
    try:
        p = subprocess.run(cmd, input=payload, capture_output=True, timeout=_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise UsageError(f"gpg did not sign with {fingerprint} within {_TIMEOUT:.0f}s (a passphrase prompt? "
                         "give --sign-passphrase-file)") from None
    created = [s for s in _status(p.stderr) if s[0] == "SIG_CREATED"]
    if p.returncode != 0 or len(created) != 1 or not p.stdout:
        why = [ln for ln in p.stderr.decode("utf-8", "replace").splitlines() if ln.startswith("gpg: ")]
        msg = why[-1][5:] if why else f"exit {p.returncode}"
        if any(w in msg for w in ("Inappropriate ioctl", "pinentry", "No passphrase", "Bad passphrase")):
            msg += " (the key needs a passphrase: give it in a file, --passphrase-file / --sign-passphrase-file)"
        raise UsageError(f"gpg cannot sign with {fingerprint}: {msg}")
    return p.stdout


def check_secret_key(fingerprint: str) -> None:
    """Refuse before anything moves when the user's keyring has no secret key ``fingerprint``."""
    try:
        p = subprocess.run([_gpg(), *_GPG_BASE, "--with-colons", "--list-secret-keys", "--", fingerprint],
                           capture_output=True, timeout=_TIMEOUT)
    except subprocess.TimeoutExpired:  # a stuck agent or keyboxd: one line, not a traceback
        raise UsageError(f"gpg did not list the secret key {fingerprint} within {_TIMEOUT:.0f}s") from None
    if p.returncode != 0 or b"\nsec:" not in b"\n" + p.stdout:
        raise UsageError(f"--sign-by {fingerprint}: no such secret key in the GPG keyring "
                         f"({os.environ.get('GNUPGHOME') or '~/.gnupg'})")


@dataclass
class Keyring:
    """A temporary GNUPGHOME holding only ``keys`` (OpenPGP public keys, binary or ASCII-armored): what a
    ``signedBy`` requirement trusts.  Use as a context manager; ``fingerprints``: the primary keys imported."""

    keys: tuple[bytes, ...]
    home: str = ""
    fingerprints: tuple[str, ...] = ()

    def __enter__(self) -> "Keyring":
        self.home = tempfile.mkdtemp(prefix="shoal-gpg-")
        try:
            fprs: list[str] = []
            for k in self.keys:
                p = self._run(["--import-options", "import-minimal", "--import"], k)
                for s in _status(p.stderr):
                    if s[0] == "IMPORT_OK" and len(s) >= 3 and s[2] not in fprs:
                        fprs.append(s[2].upper())
            self.fingerprints = tuple(fprs)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self.home:
            shutil.rmtree(self.home, ignore_errors=True)
            self.home = ""

    def _run(self, args: list[str], data: bytes) -> subprocess.CompletedProcess[bytes]:
        cmd = [_gpg(), *_GPG_BASE, "--homedir", self.home, *_GPG_VERIFY, "--status-fd", "2", *args]
        try:
            return subprocess.run(cmd, input=data, capture_output=True, timeout=_TIMEOUT,
                                  env=dict(os.environ, GNUPGHOME=self.home, LC_ALL="C"))
        except subprocess.TimeoutExpired:
            raise FormatError(f"gpg did not finish within {_TIMEOUT:.0f}s") from None

    def verify(self, blob: bytes) -> tuple[bytes, str]:
        """(the signed contents, the primary key fingerprint) of the signed message ``blob``; FormatError
        unless it holds exactly one signature, good, by one of the keys, and a payload of at most 4 MiB.
        As containers/image's gpgme check: the key's trust is not asked (the keyring is the trust)."""
        if not self.fingerprints:
            raise FormatError("no public keys imported")
        if len(blob) > MAX_PAYLOAD:
            raise FormatError("the signature is larger than 4 MiB")
        with tempfile.TemporaryFile(dir=self.home) as out:
            cmd = [_gpg(), *_GPG_BASE, "--homedir", self.home, *_GPG_VERIFY, "--status-fd", "2",
                   "--max-output", str(MAX_PAYLOAD + 1), "--output", "-", "--decrypt"]
            try:
                p = subprocess.run(cmd, input=blob, stdout=out, stderr=subprocess.PIPE, timeout=_TIMEOUT,
                                   env=dict(os.environ, GNUPGHOME=self.home, LC_ALL="C"))
            except subprocess.TimeoutExpired:
                raise FormatError(f"gpg did not finish within {_TIMEOUT:.0f}s") from None
            size = out.seek(0, os.SEEK_END)
            out.seek(0)
            contents = out.read(MAX_PAYLOAD + 1)
        st = _status(p.stderr)
        kinds = [s[0] for s in st]
        for bad, why in (("BADSIG", "signed by another key, or altered"), ("EXPSIG", "the signature expired"),
                         ("EXPKEYSIG", "the key expired"), ("REVKEYSIG", "the key is revoked"),
                         ("BEGIN_DECRYPTION", "an encrypted message, not a signature")):
            if bad in kinds:
                raise FormatError(f"cryptographic signature verification failed ({why})")
        if "ERRSIG" in kinds:
            err = next(s for s in st if s[0] == "ERRSIG")
            if (len(err) > 6 and err[6] == "9") or "NO_PUBKEY" in kinds:  # rc 9: no public key
                raise FormatError("cryptographic signature verification failed (signed by another key: "
                                   f"{err[1] if len(err) > 1 else '?'} is not one of the policy's keys)")
            raise FormatError("cryptographic signature verification failed (gpg cannot check it)")
        good, valid = kinds.count("GOODSIG"), [s for s in st if s[0] == "VALIDSIG"]
        if kinds.count("NEWSIG") > 1 or good > 1 or len(valid) > 1:
            raise FormatError(f"unexpected GPG signature count {max(good, len(valid), kinds.count('NEWSIG'))}")
        if p.returncode != 0 or good != 1 or len(valid) != 1 or len(valid[0]) < 2:
            msgs = [ln for ln in p.stderr.decode("utf-8", "replace").splitlines() if ln.startswith("gpg: ")]
            hint = msgs[-1][5:][:120] if msgs else f"gpg exit {p.returncode}"
            raise FormatError(f"not a valid OpenPGP signature ({hint})")
        if size > MAX_PAYLOAD:
            raise FormatError("the signed payload is larger than 4 MiB")
        fpr = (valid[0][10] if len(valid[0]) > 10 else valid[0][1]).upper()  # the primary key's
        if fpr not in self.fingerprints:
            raise FormatError(f"signature by key {fpr} is not accepted")
        return contents, fpr
