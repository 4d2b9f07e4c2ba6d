"""Registry TLS as containers/image does it, end to end through the ``shoal`` CLI against the real
distribution 2.8 ``docker-registry`` with certificates from throwaway CAs (``cryptography``).

The system trust store is OpenSSL's default paths.  These tests never touch the real ``/etc/ssl``:
to put a test CA "in the system store", the ``shoal`` subprocess gets ``SSL_CERT_FILE`` pointing at a
copy of the system bundle plus that CA, which is exactly how OpenSSL's default paths are overridden
(and what ``update-ca-certificates`` would have produced in ``/etc/ssl/certs/ca-certificates.crt``).

Also unit tests of ``shoal.transports.registry.tls``.
"""

# ruff: noqa: F811  (pytest fixtures imported from regfix are redefined as parameters)
from __future__ import annotations

import datetime as dt
import ipaddress
import shutil
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import helpers  # noqa: E402
from regfix import REGISTRY_BIN, Registry, free_port  # noqa: E402
from shoal.build import BuildOptions, build  # noqa: E402
from shoal.errors import UsageError  # noqa: E402
from shoal.store import Store  # noqa: E402
from shoal.transports.registry.tls import TLSContext, TLSOptions, host_cert_dir, speaks_tls, tls_context  # noqa: E402

SYSTEM_BUNDLE = Path(ssl.get_default_verify_paths().openssl_cafile)


# ------------------------------------------------------------------------------------------ a throwaway PKI

@dataclass(frozen=True)
class CA:
    name: str
    cert_pem: bytes
    key: object  # an ec private key

    @classmethod
    def make(cls, name: str) -> CA:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = dt.datetime.now(dt.UTC)
        cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=30))
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                             content_commitment=False, key_encipherment=False,
                                             data_encipherment=False, key_agreement=False, encipher_only=False,
                                             decipher_only=False), critical=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                .sign(key, hashes.SHA256()))
        return cls(name, cert.public_bytes(serialization.Encoding.PEM), key)

    def issue(self, d: Path, stem: str, *, ips: tuple[str, ...] = (), client: bool = False,
              cert_ext: str = ".pem") -> tuple[Path, Path]:
        """A leaf certificate (server for ``ips`` and localhost, or client) and its key, written in ``d``."""
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

        ca_cert = x509.load_pem_x509_certificate(self.cert_pem)
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        b = (x509.CertificateBuilder()
             .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, stem)]))
             .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=30))
             .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
             .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()),  # type: ignore[arg-type]
                            critical=False)
             .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH if client
                                                   else ExtendedKeyUsageOID.SERVER_AUTH]), critical=False))
        if not client:
            b = b.add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost")] + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]), critical=False)
        cert = b.sign(self.key, hashes.SHA256())  # type: ignore[arg-type]
        cert_path, key_path = d / f"{stem}{cert_ext}", d / f"{stem}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        return cert_path, key_path

    def write(self, path: Path) -> Path:
        path.write_bytes(self.cert_pem)
        return path


def other_address() -> str | None:
    """A non-loopback IPv4 address of this machine that a server can listen on, or None."""
    try:
        out = subprocess.run(["hostname", "-I"], capture_output=True, text=True, timeout=5).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return None
    for a in out:
        try:
            ip = ipaddress.ip_address(a)
        except ValueError:
            continue
        if ip.version == 4 and not ip.is_loopback:
            try:
                free_port(a)
            except OSError:
                continue
            return a
    return None


# ------------------------------------------------------------------------------------------ fixtures

@dataclass(frozen=True)
class Env:
    d: Path
    ca1: CA  # trusted through SSL_CERT_FILE ("the system store")
    ca2: CA  # trusted only through --ca-bundle
    client_ca: CA  # issues the client certificate of the mTLS registry
    reg1: Registry  # TLS on 127.0.0.1, cert from ca1
    reg2: Registry  # TLS on 127.0.0.1, cert from ca2
    mtls: Registry  # TLS from ca1, requires a client cert from client_ca
    system_plus_ca1: Path  # the system bundle plus ca1
    client_dir: Path  # ca.crt (ca1) + client.cert + client.key
    image: Path  # a store with a:1


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    if not Path(REGISTRY_BIN).exists():
        pytest.skip("docker-registry (distribution) is not installed")
    d = tmp_path_factory.mktemp("tls")
    ca1, ca2, cca = CA.make("shoal test CA 1"), CA.make("shoal test CA 2"), CA.make("shoal test client CA")
    bundle = d / "system-plus-ca1.pem"
    bundle.write_bytes(SYSTEM_BUNDLE.read_bytes().rstrip(b"\n") + b"\n" + ca1.cert_pem)
    client_dir = d / "client-certs"
    client_dir.mkdir()
    ca1.write(client_dir / "ca.crt")
    cca.issue(client_dir, "client", client=True, cert_ext=".cert")
    regs: list[Registry] = []
    try:
        for name, ca, client_ca in (("reg1", ca1, None), ("reg2", ca2, None), ("mtls", ca1, cca)):
            (d / name).mkdir()
            cert = ca.issue(d / name, "server", ips=("127.0.0.1",))
            regs.append(Registry(d / name, tls_cert=cert,
                                 client_ca=cca.write(d / name / "client-ca.pem") if client_ca else None))
            regs[-1].start()
        tree = helpers.write_tree(d / "tree", {"etc/hello.txt": b"hello tls\n", "bin/x": bytes(range(256)) * 64})
        build(Store.open(d / "store"), tree, "a:1", BuildOptions(workers=1))
        yield Env(d, ca1, ca2, cca, regs[0], regs[1], regs[2], bundle, client_dir, d / "store")
    finally:
        for r in regs:
            r.close()


@pytest.fixture(autouse=True)
def _no_user_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No credentials or ~/.config/containers/certs.d of this machine's user; OpenSSL's own default paths."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for k in ("SSL_CERT_FILE", "SSL_CERT_DIR", "REGISTRY_AUTH_FILE", "DOCKER_CONFIG", "XDG_RUNTIME_DIR",
              "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(k, raising=False)


def shoal(store: Path | None, *args: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
    return helpers.run_shoal(store, *args, "--retries", "0", check=check, timeout=60)


# ------------------------------------------------------------------------------------------ end to end

def test_system_store_is_trusted_and_a_tls_loopback_registry_needs_no_flag(
        env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """(a) and (d): a CA in the system store (SSL_CERT_FILE, see the module docstring) is trusted with no
    flag, and a TLS registry on 127.0.0.1 is spoken to in TLS without --plain-http=false."""
    ref = f"docker://{env.reg1.host}/tls/sys:1"
    p = shoal(env.image, "push", "a:1", ref, check=False)  # ca1 is not trusted yet: verified, refused
    line = helpers.assert_one_line_error(p, "local issuer certificate")
    assert p.returncode == 7, line
    monkeypatch.setenv("SSL_CERT_FILE", str(env.system_plus_ca1))
    shoal(env.image, "push", "a:1", ref)
    shoal(tmp_path / "s", "pull", ref, "b:1")
    assert Store.open(tmp_path / "s").resolve("b:1").root == Store.open(env.image).resolve("a:1").root


def test_ca_bundle_adds_to_the_system_store(env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """(b): ca1 from the system store and ca2 from --ca-bundle, both trusted in one copy."""
    monkeypatch.setenv("SSL_CERT_FILE", str(env.system_plus_ca1))
    src, dst = f"docker://{env.reg1.host}/tls/add:1", f"docker://{env.reg2.host}/tls/add:1"
    shoal(env.image, "push", "a:1", src)
    ca2 = env.ca2.write(tmp_path / "ca2.pem")
    p = shoal(None, "copy", src, dst, check=False)
    helpers.assert_one_line_error(p, "local issuer certificate")
    shoal(None, "copy", src, dst, "--ca-bundle", str(ca2))
    out = shoal(None, "inspect", dst, "--ca-bundle", str(ca2)).stdout
    assert b"sha256:" in out
    # the same through a cert dir (its *.crt are added too)
    certs = tmp_path / "certs"
    certs.mkdir()
    shutil.copy(ca2, certs / "ca.crt")
    shoal(None, "copy", dst, f"docker://{env.reg1.host}/tls/add:2", "--cert-dir", str(certs))


def test_mtls_client_certificate_from_the_cert_dir(env: Env, tmp_path: Path) -> None:
    """(c): --cert-dir with ca.crt + client.cert + client.key; without the pair, one clear error line."""
    ref = f"docker://{env.mtls.host}/tls/mtls:1"
    shoal(env.image, "push", "a:1", ref, "--cert-dir", str(env.client_dir))
    shoal(tmp_path / "s", "pull", ref, "b:1", "--cert-dir", str(env.client_dir))
    only_ca = tmp_path / "only-ca"
    only_ca.mkdir()
    shutil.copy(env.client_dir / "ca.crt", only_ca / "ca.crt")
    p = shoal(None, "inspect", ref, "--cert-dir", str(only_ca), check=False)
    line = helpers.assert_one_line_error(p, "TLS", "certificate")
    assert p.returncode == 7, line
    # a .cert without its .key (or the reverse) is refused before anything is sent, naming the file
    for missing, word in (("client.key", "missing key client.key"), ("client.cert", "missing client certificate")):
        half = tmp_path / f"half-{missing}"
        shutil.copytree(env.client_dir, half)
        (half / missing).unlink()
        p = shoal(None, "inspect", ref, "--cert-dir", str(half), check=False)
        line = helpers.assert_one_line_error(p, word)
        assert p.returncode == 2 and str(half) in line, line


def test_bad_pem_is_one_usage_error(env: Env, tmp_path: Path) -> None:
    bad = tmp_path / "bad.pem"
    bad.write_text("-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n")
    p = shoal(None, "inspect", f"docker://{env.reg1.host}/tls/none:1", "--ca-bundle", str(bad), check=False)
    line = helpers.assert_one_line_error(p, "bad.pem")
    assert p.returncode == 2, line
    certs = tmp_path / "certs"
    certs.mkdir()
    (certs / "ca.crt").write_bytes(b"\x00\x01binary")
    p = shoal(None, "inspect", f"docker://{env.reg1.host}/tls/none:1", "--cert-dir", str(certs), check=False)
    line = helpers.assert_one_line_error(p, "ca.crt")
    assert p.returncode == 2, line


def test_plain_http_off_loopback_needs_tls_verify_false(env: Env, tmp_path: Path) -> None:
    """(e): a plain-HTTP registry on a non-loopback address is refused unless --tls-verify=false (which
    tries TLS unverified, then HTTP) or --plain-http; a plain loopback registry needs nothing."""
    addr = other_address()
    if addr is None:
        pytest.skip("no non-loopback IPv4 address to listen on (hostname -I)")
    reg = Registry(tmp_path / "reg", bind=addr)
    reg.start()
    try:
        ref = f"docker://{reg.host}/tls/plain:1"
        p = shoal(env.image, "push", "a:1", ref, check=False)
        line = helpers.assert_one_line_error(p, "plain HTTP")
        assert p.returncode == 7, line
        shoal(env.image, "push", "a:1", ref, "--tls-verify=false")
        shoal(None, "inspect", ref, "--plain-http")
        p = shoal(None, "inspect", ref, "--plain-http=false", "--tls-verify=false", check=False)
        helpers.assert_one_line_error(p, "TLS")  # forced https: no fallback
    finally:
        reg.close()
    plain = Registry(tmp_path / "loop")
    plain.start()
    try:
        shoal(env.image, "push", "a:1", f"docker://{plain.host}/tls/plain:1")
    finally:
        plain.close()


# ------------------------------------------------------------------------------------------ tls.py

def test_speaks_tls_tells_tls_from_plain_http(env: Env, tmp_path: Path) -> None:
    assert speaks_tls("127.0.0.1", env.reg1.port, 5.0)
    assert speaks_tls("127.0.0.1", env.mtls.port, 5.0)  # no client certificate needed to tell
    plain = Registry(tmp_path / "plain")
    plain.start()
    try:
        assert not speaks_tls("127.0.0.1", plain.port, 5.0)
    finally:
        plain.close()
    with pytest.raises(OSError):
        speaks_tls("127.0.0.1", free_port(), 5.0)
    with socket.socket() as silent:  # listens, never answers: not TLS, after the timeout
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        assert not speaks_tls("127.0.0.1", silent.getsockname()[1], 0.2)


def test_context_adds_extras_to_the_system_roots(env: Env, tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    certs.mkdir()
    env.ca2.write(certs / "b.crt")
    (certs / "notes.txt").write_text("ignored")
    ctx = TLSContext("example.test", TLSOptions(ca_bundle=str(env.ca1.write(tmp_path / "ca1.pem")),
                                                 cert_dir=str(certs)))
    assert ctx.extra_cas == (str(tmp_path / "ca1.pem"), str(certs / "b.crt")) and ctx.client_cert is None
    n_extra = ctx._ctx.cert_store_stats()["x509_ca"]
    assert n_extra == 2
    system = ssl.create_default_context().cert_store_stats()["x509_ca"]
    assert ctx.get().cert_store_stats()["x509_ca"] == system + 2  # added, not replaced
    assert tls_context("example.test", TLSOptions()) is tls_context("example.test", TLSOptions())
    unverified = TLSContext("example.test", TLSOptions(verify=False, cert_dir=str(env.client_dir)))
    assert unverified.get().verify_mode == ssl.CERT_NONE and unverified.client_cert is not None


def test_host_cert_dir_order_and_pairs(tmp_path: Path) -> None:
    bases = (str(tmp_path / "containers"), str(tmp_path / "docker"))
    assert host_cert_dir("r.test:5000", None, bases) is None
    (tmp_path / "docker" / "r.test:5000").mkdir(parents=True)
    assert host_cert_dir("r.test:5000", None, bases) == tmp_path / "docker" / "r.test:5000"
    (tmp_path / "containers" / "r.test:5000").mkdir(parents=True)
    assert host_cert_dir("r.test:5000", None, bases) == tmp_path / "containers" / "r.test:5000"
    assert host_cert_dir("r.test", str(tmp_path), bases) == tmp_path  # --cert-dir replaces the lookup
    with pytest.raises(UsageError, match="does not exist"):
        host_cert_dir("r.test", str(tmp_path / "nope"), bases)
    d = tmp_path / "pair"
    d.mkdir()
    (d / "c.key").write_text("x")
    with pytest.raises(UsageError, match="missing client certificate c.cert"):
        TLSContext("r.test", TLSOptions(cert_dir=str(d)))
    (d / "c.cert").write_text("not a certificate")
    with pytest.raises(UsageError, match="cannot load client certificate"):
        TLSContext("r.test", TLSOptions(cert_dir=str(d)))
