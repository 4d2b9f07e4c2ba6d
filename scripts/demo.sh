#!/bin/bash
# Shoal's main job, end to end, on a real Debian root filesystem:
# build two related images into a local store, inspect/ls/diff them, unpack and verify byte for byte.
set -euo pipefail

CACHE=${SHOAL_DEMO_CACHE:-/var/tmp/shoal-demo}
WORK=$(mktemp -d /var/tmp/shoal-demo-run.XXXXXX)
export SHOAL_STORE=$WORK/store
REG_PID=
cleanup() { [ -n "$REG_PID" ] && kill "$REG_PID" 2>/dev/null; wait 2>/dev/null; rm -rf "$WORK"; }
trap cleanup EXIT
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

# A real registry (distribution 2.8, Debian's docker-registry) on loopback, started and stopped here.
start_registry() {
  local port
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  mkdir -p "$WORK/registry"
  cat > "$WORK/registry/config.yml" <<YML
version: 0.1
log: {level: error}
storage:
  filesystem: {rootdirectory: $WORK/registry/data}
  delete: {enabled: true}
http: {addr: 127.0.0.1:$port, secret: shoal-demo}
YML
  docker-registry serve "$WORK/registry/config.yml" >"$WORK/registry/log" 2>&1 &
  REG_PID=$!
  REG=127.0.0.1:$port
  for _ in $(seq 100); do curl -fs "http://$REG/v2/" >/dev/null 2>&1 && return 0; sleep 0.1; done
  echo "registry did not start" >&2; cat "$WORK/registry/log" >&2; exit 1
}

if [ ! -e "$CACHE/bookworm/.complete" ]; then
  say "making a real root filesystem: debootstrap --variant=minbase bookworm (cached in $CACHE)"
  rm -rf "$CACHE/bookworm"; mkdir -p "$CACHE/bookworm"
  debootstrap --variant=minbase bookworm "$CACHE/bookworm/root" >"$CACHE/debootstrap.log" 2>&1
  touch "$CACHE/bookworm/.complete"
fi
V1=$CACHE/bookworm/root

say "v2 = v1 with documentation removed, a config changed and a 20 MB file added"
cp -a "$V1" "$WORK/v2"
rm -rf "$WORK/v2/usr/share/doc"
echo "Welcome to Shoal." > "$WORK/v2/etc/motd"
head -c 20000000 /dev/urandom > "$WORK/v2/opt/blob.bin"

say "shoal build (v1, then v2: the chunks the store holds are taken from where they are, no flag)"
shoal build "$V1" demo:v1
before=$(du -sb "$SHOAL_STORE/blobs" | cut -f1)
shoal build "$WORK/v2" demo:v2
echo "the store grew by $(( ($(du -sb "$SHOAL_STORE/blobs" | cut -f1) - before) / 1000000 )) MB for v2 (its 20 MB file, an index)"
shoal images

say "shoal inspect demo:v1"
shoal inspect demo:v1

say "shoal ls demo:v1 /etc/apt -l (from the index alone)"
shoal ls demo:v1 /etc/apt -l

say "shoal cat demo:v1 /etc/os-release"
shoal cat demo:v1 /etc/os-release | sed -n 1,3p

say "shoal diff demo:v1 demo:v2 (Merkle walk; what a pull of v2 over v1 would fetch)"
shoal diff demo:v1 demo:v2 2>&1 | tail -4

say "shoal unpack demo:v1, then compare with the source entry by entry"
shoal unpack demo:v1 "$WORK/unpacked"
listing() { (cd "$1" && find . \( -type d -printf '%p d %m %U %G %T@\n' \) -o -printf '%p %y %m %U %G %T@ %s %l\n' | LC_ALL=C sort); }
if diff <(listing "$V1") <(listing "$WORK/unpacked"); then
  echo "metadata: identical ($(listing "$V1" | wc -l) entries: type, mode, owner, mtime ns, size, link target)"
else
  echo "metadata differs" >&2; exit 1
fi
if diff -r --no-dereference "$V1" "$WORK/unpacked" 2>&1 | grep -v 'character special file' | grep -q .; then
  echo "content differs" >&2; exit 1
fi
echo "content: identical"

say "a real registry on loopback: push v1 and v2 (only v2's new packs travel), then pull into a new store"
start_registry
echo "registry at $REG ($(du -sh "$WORK/registry/data" 2>/dev/null | cut -f1 || echo 0) before push)"
shoal push demo:v1 "docker://$REG/demo/debian:v1"
shoal push demo:v2 "docker://$REG/demo/debian:v2"
echo "registry holds $(du -sb "$WORK/registry/data" | cut -f1) bytes for both images"
shoal inspect "docker://$REG/demo/debian:v2"
SHOAL_STORE=$WORK/store2 shoal pull "docker://$REG/demo/debian:v1" demo:v1
SHOAL_STORE=$WORK/store2 shoal pull "docker://$REG/demo/debian:v2" demo:v2
SHOAL_STORE=$WORK/store2 shoal fsck

say "provenance: sign v1 in the registry, verify it, and pull it only under a policy that requires the signature"
export COSIGN_PASSWORD=demo-passphrase
shoal key generate --output "$WORK/cosign.key"
shoal key generate --output "$WORK/other.key"
shoal sign "docker://$REG/demo/debian:v1" --key "$WORK/cosign.key"
shoal verify "docker://$REG/demo/debian:v1" --key "$WORK/cosign.pub"
policy() {  # a containers-policy.json that requires a sigstore signature by key $1 for the demo repository
  printf '{"default": [{"type": "reject"}], "transports": {"docker": {"%s": [{"type": "sigstoreSigned", "keyPath": "%s"}]}}}\n' \
    "$REG/demo" "$1" > "$2"
}
policy "$WORK/cosign.pub" "$WORK/policy.json"
policy "$WORK/other.pub" "$WORK/policy-other.json"
SHOAL_STORE=$WORK/store4 shoal pull --signature-policy "$WORK/policy.json" "docker://$REG/demo/debian:v1" signed:v1
echo "with a policy that wants another key:"
if SHOAL_STORE=$WORK/store5 shoal pull --signature-policy "$WORK/policy-other.json" "docker://$REG/demo/debian:v1" x:1; then
  echo "accepted an image signed by another key" >&2; exit 1
else
  echo "refused (exit $?), nothing pulled: $(SHOAL_STORE=$WORK/store5 shoal images | tail -n +2 | wc -l) images in that store"
fi
echo "unsigned v2 under the same policy:"
SHOAL_STORE=$WORK/store5 shoal pull --signature-policy "$WORK/policy.json" "docker://$REG/demo/debian:v2" x:2 \
  && { echo "accepted an unsigned image" >&2; exit 1; } || echo "refused (exit $?)"

say "transparency: an SBOM of v1 straight from the registry (reads only the package databases), and what v2 changed in packages"
shoal sbom "docker://$REG/demo/debian:v1" --format spdx-json -o "$WORK/v1.spdx.json"
shoal diff demo:v1 demo:v2 --packages --json | python3 -c '
import collections, json, sys
d = json.load(sys.stdin)
owners = collections.Counter(p.split("@")[0] for purls in d["files"].values() for p in purls)
print("packages added %d, removed %d, upgraded %d; %d changed paths, owned by %d packages (most: %s)" % (
    len(d["added"]), len(d["removed"]), len(d["upgraded"]), len(d["files"]), len(owners),
    ", ".join("%s %d" % (p, n) for p, n in owners.most_common(3))))'

say "update without rebuild: an app built by a recipe on v1, rebased onto v2; its push sends an index, no data"
mkdir -p "$WORK/app"
printf '#!/bin/sh\necho "hello from $(. /etc/os-release; echo $PRETTY_NAME)"\n' > "$WORK/app/hello"
chmod 755 "$WORK/app/hello"
cat > "$WORK/app/app.yaml" <<YML
app:1:
  from: demo:v1
  copy: [{src: hello, dst: /usr/local/bin/hello}]
  cmd: [/usr/local/bin/hello]
YML
shoal build -f "$WORK/app/app.yaml"
shoal rebase app:1 --onto demo:v2 -t app:2
shoal inspect app:2 | grep -E "^(Base|Digest)"
shoal push app:1 "docker://$REG/demo/app:1" >/dev/null
shoal push --json app:2 "docker://$REG/demo/app:2" | python3 -c '
import json, sys
d = json.load(sys.stdin)
print("push of the rebased app:2 (the registry holds app:1 and v2): %d blobs, %.2f MB sent" % (d["blobs_sent"], d["bytes_sent"] / 1e6))'

say "lazy: run a container straight from the registry on a cold store; only what it reads is fetched"
export SHOAL_RUN_DIR=$WORK/run
# time to the container's first line of output, from a cold store (the command's exit code passes through)
SHOAL_STORE=$WORK/store3 python3 - "$(command -v shoal)" "docker://$REG/demo/debian:v1" <<'PY' && rc=0 || rc=$?
import subprocess, sys, time
t0 = time.monotonic()
p = subprocess.Popen([sys.argv[1], "run", "--rm", sys.argv[2], "--", "sh", "-c", "grep PRETTY /etc/os-release; exit 3"],
                     stdout=subprocess.PIPE)
first = p.stdout.readline()
dt = time.monotonic() - t0
sys.stdout.write(first.decode() + p.stdout.read().decode())
rc = p.wait()
print(f"time to first output: {dt:.2f} s (cold store; includes starting the CLI, the mount and runc)")
sys.exit(rc)
PY
echo "container exit code: $rc (expected 3)"
[ "$rc" = 3 ] || { echo "unexpected exit code" >&2; exit 1; }
fetched=$(du -sb "$WORK/store3/partial" "$WORK/store3/blobs" 2>/dev/null | awk '{s+=$1} END {print s}')
image=$(shoal inspect demo:v1 --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["size"])')
python3 -c "import sys; f, i = int(sys.argv[1]), int(sys.argv[2]); print(f'fetched into the cold store: {f / 1e6:.1f} MB of a {i / 1e6:.1f} MB image ({100 * f / i:.1f}%)')" "$fetched" "$image"

say "classic images in and out: umoci makes a classic OCI image of v2, shoal converts it, then exports it back"
umoci init --layout "$WORK/classic" >/dev/null
umoci new --image "$WORK/classic:v2" >/dev/null
umoci unpack --image "$WORK/classic:v2" "$WORK/bundle" >/dev/null
cp -a "$WORK/v2/." "$WORK/bundle/rootfs/"
umoci repack --image "$WORK/classic:v2" "$WORK/bundle" >/dev/null
shoal convert "oci:$WORK/classic:v2" demo:v2-converted
echo "converted vs built (a classic tar keeps some mtimes in whole seconds, so those paths show as changed):"
shoal diff demo:v2 demo:v2-converted --json | python3 -c 'import json,sys; d=json.load(sys.stdin); print("  %d added, %d removed, %d metadata-changed, %d new chunks: file contents identical" % (len(d["added"]), len(d["removed"]), len(d["changed"]), d["new_chunks"]))'
classic_bytes=$(du -sb "$WORK/classic/blobs" | cut -f1)
shoal_bytes=$(du -sb "$SHOAL_STORE/blobs" | cut -f1)
echo "classic OCI layout for v2 alone: $classic_bytes bytes; Shoal store for v1 + v2 + the conversion: $shoal_bytes bytes"
shoal export demo:v2-converted "oci:$WORK/exported:v2" --compression zstd
shoal export demo:v2-converted "oci:$WORK/exported2:v2" --compression zstd >/dev/null
if cmp -s "$WORK/exported/index.json" "$WORK/exported2/index.json"; then echo "export is byte-reproducible (same manifest digest twice)"; fi
skopeo inspect "oci:$WORK/exported:v2" | python3 -c 'import json,sys; d=json.load(sys.stdin); print("skopeo inspect of the export:", d["Architecture"], d["Os"], len(d["Layers"]), "layer")'

say "shoal fsck; shoal rm demo:v2; shoal gc"
shoal fsck
shoal rm demo:v2
shoal gc
echo
echo "demo complete"
