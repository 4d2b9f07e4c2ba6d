"""What the registry client imports (issue 12: a lazy mount's first request waits for them).

httpcore imports trio and anyio, if installed, for async code Shoal never runs: the registry package
hides them while httpcore loads (transports/registry/__init__.py), and they stay importable after.
"""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[2] / "src")


def _run(code: str) -> list[str]:
    env = dict(os.environ, PYTHONPATH=SRC)
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    out: list[str] = json.loads(p.stdout.splitlines()[-1])
    return out


class _Ping(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args: object) -> None:
        pass


def test_registry_requests_load_no_async_library() -> None:
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Ping)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        code = ("import sys, json\n"
                "from shoal.transports.registry import RegistryClient\n"
                "import httpx\n"
                f"assert httpx.Client().get('http://127.0.0.1:{srv.server_address[1]}/v2/').status_code == 200\n"
                "print(json.dumps([m for m in ('trio', 'anyio', 'attr') if m in sys.modules]))")
        assert _run(code) == []
    finally:
        srv.shutdown()
        srv.server_close()


def test_async_libraries_stay_importable() -> None:
    code = ("import sys, json\n"
            "import shoal.transports.registry.client\n"
            "import trio, anyio\n"
            "async def one() -> int:\n"
            "    return 1\n"
            "assert trio.run(one) == 1\n"
            "print(json.dumps([m for m in ('trio', 'anyio') if sys.modules.get(m) is None]))")
    assert _run(code) == []


def test_a_policy_that_accepts_anything_loads_no_cryptography(tmp_path: Path) -> None:
    """``shoal run``/``mount`` check the signature policy before the first request: when it accepts
    anything, the signature code's cryptography (~40 ms) is not loaded (trust/keys.py loads it on use)."""
    pol = tmp_path / "policy.json"
    pol.write_text('{"default": [{"type": "insecureAcceptAnything"}]}')
    code = ("import sys, json\n"
            "import shoal.cli.mount_cmds, shoal.mount.run, shoal.mount.remote\n"
            "from shoal.transports.base import parse_reference\n"
            "from shoal.transports.context import SystemContext\n"
            "from shoal.trust.image import admit\n"
            f"a = admit(parse_reference('docker://127.0.0.1:1/x:1'), SystemContext(signature_policy={str(pol)!r}))\n"
            "assert a is not None and a.digest == ''\n"
            "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules} & {'cryptography', 'nacl'})))")
    assert _run(code) == []
    # and a signature check still has it when it needs it
    code = ("import json\nfrom shoal.trust.keys import generate, load_public_key\n"
            "k = generate()\nsig = k.sign(b'x')\npub = load_public_key(k.public().pem())\n"
            "print(json.dumps([pub.verify(sig, b'x'), pub.verify(sig, b'y')]))")
    assert _run(code) == [True, False]
