"""Sigstore/cosign key pairs (docs/spec/trust.md §1).

The private key file is cosign's: a PEM block ``ENCRYPTED COSIGN PRIVATE KEY`` (containers/image 5.23
reads only this type; newer cosign writes ``ENCRYPTED SIGSTORE PRIVATE KEY``, also read here) whose
bytes are the JSON document of go-tuf's ``encrypted`` package::

    {"kdf": {"name": "scrypt", "params": {"N": 32768, "r": 8, "p": 1}, "salt": "<base64>"},
     "cipher": {"name": "nacl/secretbox", "nonce": "<base64>"},
     "ciphertext": "<base64>"}

the key is scrypt(passphrase, salt, N, r, p, 32 bytes), the plaintext the PKCS#8 DER of the private
key.  The public key is a PEM ``PUBLIC KEY`` (SubjectPublicKeyInfo).  Shoal generates ECDSA P-256
keys and verifies ECDSA (SHA-256), RSA (PKCS#1 v1.5, SHA-256) and Ed25519 public keys, as sigstore's
``LoadVerifier`` does.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from shoal.errors import FormatError, UsageError

if TYPE_CHECKING:  # cryptography is imported where it is used: ~30 ms that `shoal run` need not pay
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

__all__ = ["PrivateKey", "PublicKey", "generate", "encrypt_private_key", "load_private_key", "load_public_key",
           "PEM_PRIVATE", "PEM_PRIVATE_SIGSTORE"]

PEM_PRIVATE = "ENCRYPTED COSIGN PRIVATE KEY"  # what containers/image 5.23 (skopeo 1.9) reads
PEM_PRIVATE_SIGSTORE = "ENCRYPTED SIGSTORE PRIVATE KEY"  # newer cosign and containers/image
_SCRYPT = {"N": 32768, "r": 8, "p": 1}  # go-tuf's defaults (what cosign writes)
_MAX_N = 1 << 20  # a hostile file must not ask for gigabytes of scrypt memory


@dataclass(frozen=True)
class PublicKey:
    key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey

    def verify(self, signature: bytes, payload: bytes) -> bool:
        """True when ``signature`` (DER for ECDSA) is this key's signature of ``payload`` (SHA-256)."""
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

        try:
            if isinstance(self.key, ec.EllipticCurvePublicKey):
                self.key.verify(signature, payload, ec.ECDSA(hashes.SHA256()))
            elif isinstance(self.key, rsa.RSAPublicKey):
                self.key.verify(signature, payload, padding.PKCS1v15(), hashes.SHA256())
            else:
                self.key.verify(signature, payload)
        except InvalidSignature:
            return False
        return True

    def pem(self) -> bytes:
        from cryptography.hazmat.primitives import serialization

        return self.key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)

    def fingerprint(self) -> str:
        """sha256 of the DER SubjectPublicKeyInfo, for messages."""
        from cryptography.hazmat.primitives import serialization

        der = self.key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        return "sha256:" + hashlib.sha256(der).hexdigest()


@dataclass(frozen=True)
class PrivateKey:
    key: ec.EllipticCurvePrivateKey

    def sign(self, payload: bytes) -> bytes:
        """The DER ECDSA (SHA-256) signature of ``payload``."""
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec

        return self.key.sign(payload, ec.ECDSA(hashes.SHA256()))

    def public(self) -> PublicKey:
        return PublicKey(self.key.public_key())


def generate() -> PrivateKey:
    """A new ECDSA P-256 key, as ``cosign generate-key-pair``."""
    from cryptography.hazmat.primitives.asymmetric import ec

    return PrivateKey(ec.generate_private_key(ec.SECP256R1()))


def _scrypt(passphrase: bytes, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(passphrase, salt=salt, n=n, r=r, p=p, maxmem=256 * r * n + (1 << 20), dklen=32)


def encrypt_private_key(key: PrivateKey, passphrase: bytes) -> bytes:
    """The PEM file cosign writes for ``key`` encrypted with ``passphrase``."""
    import nacl.secret
    from cryptography.hazmat.primitives import serialization

    der = key.key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    salt, nonce = os.urandom(32), os.urandom(24)
    box = nacl.secret.SecretBox(_scrypt(passphrase, salt, _SCRYPT["N"], _SCRYPT["r"], _SCRYPT["p"]))
    ct = box.encrypt(der, nonce).ciphertext
    doc = {"kdf": {"name": "scrypt", "params": dict(_SCRYPT), "salt": _b64(salt)},
           "cipher": {"name": "nacl/secretbox", "nonce": _b64(nonce)}, "ciphertext": _b64(ct)}
    return _pem(PEM_PRIVATE, json.dumps(doc).encode())


def load_private_key(data: bytes, passphrase: bytes, where: str = "private key") -> PrivateKey:
    """Decrypt a cosign private key file; a wrong passphrase or a malformed file is a UsageError/FormatError."""
    import nacl.exceptions
    import nacl.secret
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    kind, body = _unpem(data, where)
    if kind not in (PEM_PRIVATE, PEM_PRIVATE_SIGSTORE):
        raise FormatError(f"{where}: unsupported PEM type {kind!r} (want {PEM_PRIVATE!r})")
    try:
        doc = json.loads(body)
        kdf, cipher = doc["kdf"], doc["cipher"]
        if kdf["name"] != "scrypt" or cipher["name"] != "nacl/secretbox":
            raise FormatError(f"{where}: unsupported kdf/cipher {kdf['name']}/{cipher['name']}")
        prm = kdf["params"]
        n, r, p = int(prm["N"]), int(prm["r"]), int(prm["p"])
        salt, nonce, ct = _unb64(kdf["salt"]), _unb64(cipher["nonce"]), _unb64(doc["ciphertext"])
    except (ValueError, KeyError, TypeError) as exc:
        raise FormatError(f"{where}: not a cosign encrypted key ({exc})") from None
    if not (1 < n <= _MAX_N and n & (n - 1) == 0 and 0 < r <= 32 and 0 < p <= 16 and len(nonce) == 24):
        raise FormatError(f"{where}: scrypt parameters out of range (N={n}, r={r}, p={p})")
    try:
        der = nacl.secret.SecretBox(_scrypt(passphrase, salt, n, r, p)).decrypt(ct, nonce)
    except nacl.exceptions.CryptoError:
        raise UsageError(f"{where}: wrong passphrase (or a corrupted key file)") from None
    key = serialization.load_der_private_key(der, None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise FormatError(f"{where}: only ECDSA private keys can sign here")
    return PrivateKey(key)


def load_public_key(data: bytes, where: str = "public key") -> PublicKey:
    """A PEM ``PUBLIC KEY`` (ECDSA, RSA or Ed25519)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

    try:
        key = serialization.load_pem_public_key(data)
    except ValueError as exc:
        raise FormatError(f"{where}: not a PEM public key ({exc})") from None
    if not isinstance(key, (ec.EllipticCurvePublicKey, rsa.RSAPublicKey, ed25519.Ed25519PublicKey)):
        raise FormatError(f"{where}: unsupported public key type {type(key).__name__}")
    return PublicKey(key)


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def _unb64(v: Any) -> bytes:
    if not isinstance(v, str):
        raise ValueError("base64 field is not a string")
    return base64.b64decode(v, validate=True)


def _pem(kind: str, body: bytes) -> bytes:
    b = base64.b64encode(body).decode()
    lines = [b[i:i + 64] for i in range(0, len(b), 64)]
    return (f"-----BEGIN {kind}-----\n" + "\n".join(lines) + f"\n-----END {kind}-----\n").encode()


def _unpem(data: bytes, where: str) -> tuple[str, bytes]:
    text = data.decode("ascii", "replace").strip().splitlines()
    if len(text) < 2 or not text[0].startswith("-----BEGIN ") or not text[0].endswith("-----"):
        raise FormatError(f"{where}: not a PEM file")
    kind = text[0][len("-----BEGIN "):-5]
    end = f"-----END {kind}-----"
    if end not in text:
        raise FormatError(f"{where}: PEM block {kind!r} has no end line")
    body = "".join(line.strip() for line in text[1:text.index(end)])
    try:
        return kind, base64.b64decode(body, validate=True)
    except ValueError:
        raise FormatError(f"{where}: PEM body is not base64") from None
