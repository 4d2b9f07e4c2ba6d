#!/bin/bash
# Shoal's main job, end to end, on a real Debian root filesystem:
# build two related images into a local store, inspect/ls/diff them, unpack and verify byte for byte.
set -euo pipefail

CACHE=${SHOAL_DEMO_CACHE:-/var/tmp/shoal-demo}
WORK=$(mktemp -d /var/tmp/shoal-demo-run.XXXXXX)
export SHOAL_STORE=$WORK/store
trap 'rm -rf "$WORK"' EXIT
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

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

say "shoal build (v1, then v2)"
shoal build "$V1" demo:v1
shoal build "$WORK/v2" demo:v2 --reuse demo:v1
shoal images

say "shoal inspect demo:v1"
shoal inspect demo:v1

say "shoal ls demo:v1 /etc/apt -l (from the index alone)"
shoal ls demo:v1 /etc/apt -l

say "shoal cat demo:v1 /etc/os-release"
shoal cat demo:v1 /etc/os-release | head -3

say "shoal diff demo:v1 demo:v2 (Merkle walk; what a pull of v2 over v1 would fetch)"
shoal diff demo:v1 demo:v2 2>&1 | tail -4

say "shoal unpack demo:v1, then compare with the source entry by entry"
shoal unpack demo:v1 "$WORK/unpacked"
listing() { (cd "$1" && find . -printf '%p %y %m %U %G %T@ %s %l\n' | LC_ALL=C sort); }
if diff <(listing "$V1") <(listing "$WORK/unpacked"); then
  echo "metadata: identical ($(listing "$V1" | wc -l) entries: type, mode, owner, mtime ns, size, link target)"
else
  echo "metadata differs" >&2; exit 1
fi
if diff -r --no-dereference "$V1" "$WORK/unpacked" 2>&1 | grep -v 'character special file' | grep -q .; then
  echo "content differs" >&2; exit 1
fi
echo "content: identical"

say "shoal fsck; shoal rm demo:v2; shoal gc"
shoal fsck
shoal rm demo:v2
shoal gc
echo
echo "demo complete"
