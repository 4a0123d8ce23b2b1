#!/usr/bin/env bash
# Builds kisara-test/udp-echo:latest: scripts/fixtures/kfix.c compiled with `gcc -static`
# (UDP echo, TCP echo/sink/source; busybox's nc has no UDP) beside the static busybox, so the
# image also has `sh`. Used by the exposure tests and bench/exposure.sh.
#
#   scripts/fixture-image.sh [--force]
set -euo pipefail

IMAGE="kisara-test/udp-echo:latest"
HERE=$(cd "$(dirname "$0")" && pwd)
log() { echo "fixture-image: $*" >&2; }

if [[ ${1:-} != --force ]] && docker image inspect "$IMAGE" >/dev/null 2>&1; then
    log "$IMAGE already present (use --force to rebuild)"
    exit 0
fi
command -v gcc >/dev/null 2>&1 || { log "gcc not found (apt-get install gcc libc6-dev)"; exit 1; }
[[ -x /bin/busybox ]] || { log "/bin/busybox missing: run scripts/test-images.sh first"; exit 1; }

ROOTFS=$(mktemp -d /tmp/kisara-fixture-rootfs.XXXXXX)
trap 'rm -rf "$ROOTFS"' EXIT
mkdir -p "$ROOTFS"/{bin,tmp,etc}
gcc -static -O2 -Wall -o "$ROOTFS/bin/kfix" "$HERE/fixtures/kfix.c"
install -m 0755 /bin/busybox "$ROOTFS/bin/busybox"
ln -s busybox "$ROOTFS/bin/sh"
echo 'root:x:0:0:root:/:/bin/sh' >"$ROOTFS/etc/passwd"
tar -C "$ROOTFS" --numeric-owner --owner=0 --group=0 -c . \
    | docker import --change 'CMD ["/bin/kfix", "udp-echo", "7"]' - "$IMAGE" >/dev/null
log "built $IMAGE"
