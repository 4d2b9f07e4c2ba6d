#!/usr/bin/env python3
"""The cost of a signedBy (GPG simple signing) policy check, Shoal and skopeo side by side, same run.

Usage: python bench/signedby.py [--reps N] [--rounds R]
One small Shoal image in distribution's docker-registry on loopback, signed by ``skopeo copy --all
--sign-by`` (an ed25519 key in a throwaway GNUPGHOME) into a file:// lookaside named by a registries.d.
Shoal: ``trust.image.admit`` in process (the manifests read, the lookaside read, gpg's import of the
policy's key and its verification in a temporary GNUPGHOME) under signedBy, minus the same under
insecureAcceptAnything.  skopeo: ``skopeo copy`` to an oci: layout under signedBy minus the same under
insecureAcceptAnything (its gpgme check).  Medians of N; the ratio is Shoal's extra over skopeo's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "src"))

from regfix import Registry  # noqa: E402
from shoal.transports.base import parse_reference  # noqa: E402
from shoal.transports.context import SystemContext  # noqa: E402
from shoal.trust.image import admit  # noqa: E402

SHOAL = shutil.which("shoal") or str(Path(sys.executable).parent / "shoal")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="shoal-bench-signedby-") as t:
        d = Path(t)
        home = d / "gnupg"
        home.mkdir(mode=0o700)
        env = dict(os.environ, GNUPGHOME=str(home))
        reg = Registry(d / "reg")
        reg.start()
        try:
            subprocess.run(["gpg", "--batch", "--passphrase", "", "--quick-gen-key", "Bench <b@example.com>",
                            "ed25519", "sign", "never"], env=env, check=True, capture_output=True)
            cols = subprocess.run(["gpg", "--batch", "--with-colons", "--list-keys"], env=env, check=True,
                                  capture_output=True).stdout.decode()
            fpr = [ln.split(":")[9] for ln in cols.splitlines() if ln.startswith("fpr:")][0]
            (d / "key.gpg").write_bytes(subprocess.run(["gpg", "--batch", "--export", fpr], env=env, check=True,
                                                       capture_output=True).stdout)
            (d / "tree/etc").mkdir(parents=True)
            (d / "tree/etc/hello").write_bytes(b"hello\n" * 1000)
            store = str(d / "store")
            subprocess.run([SHOAL, "--store", store, "build", str(d / "tree"), "app:1"], check=True,
                           capture_output=True)
            src, ref = f"docker://{reg.host}/b/src:1", f"docker://{reg.host}/b/app:1"
            subprocess.run([SHOAL, "--store", store, "push", "app:1", src], check=True, capture_output=True)
            regd = d / "registries.d"
            regd.mkdir()
            (regd / "b.yaml").write_text(f"docker:\n  {reg.host}/b:\n    lookaside: file://{d}/lookaside\n")
            subprocess.run(["skopeo", "--registries.d", str(regd), "copy", "--all", "--src-tls-verify=false",
                            "--dest-tls-verify=false", "--sign-by", fpr, src, ref], env=env, check=True,
                           capture_output=True)
            signed, anything = d / "signedby.json", d / "any.json"
            signed.write_text(json.dumps({"default": [{"type": "reject"}], "transports": {"docker": {
                f"{reg.host}/b": [{"type": "signedBy", "keyType": "GPGKeys", "keyPath": str(d / "key.gpg")}]}}}))
            anything.write_text(json.dumps({"default": [{"type": "insecureAcceptAnything"}]}))
            r = parse_reference(ref)

            def shoal(policy: Path) -> float:
                ctx = SystemContext(signature_policy=str(policy), registries_d=str(regd), tls_verify=False)
                ts = []
                for _ in range(a.reps):
                    s = time.perf_counter()
                    admit(r, ctx)
                    ts.append(time.perf_counter() - s)
                return statistics.median(ts) * 1000

            def skopeo(policy: Path) -> float:
                ts = []
                for i in range(a.reps):
                    out = d / f"oci-{i}"
                    shutil.rmtree(out, ignore_errors=True)
                    s = time.perf_counter()
                    subprocess.run(["skopeo", "--policy", str(policy), "--registries.d", str(regd), "copy",
                                    "--remove-signatures", "--src-tls-verify=false", ref, f"oci:{out}:x"],
                                   check=True, capture_output=True)
                    ts.append(time.perf_counter() - s)
                return statistics.median(ts) * 1000

            for n in range(a.rounds):
                # insecureAcceptAnything reads no manifest in admit(); the extra includes Shoal's manifest reads
                sx = shoal(signed) - shoal(anything)
                kx = skopeo(signed) - skopeo(anything)
                print(f"round {n}: signedBy check extra: shoal {sx:.1f} ms, skopeo {kx:.1f} ms, "
                      f"ratio {sx / kx if kx > 0 else float('nan'):.2f}", flush=True)
        finally:
            reg.close()
            subprocess.run(["gpgconf", "--kill", "all"], env=env, capture_output=True)


if __name__ == "__main__":
    main()
