#!/usr/bin/env bash
# Builds kisara-test/iperf3:latest for bench/exposure.py: Debian's iperf3 with the shared
# libraries it links (found with ldd), the kfix fixture (TCP/UDP echo) and the static busybox
# for `sh`, imported without a registry like the other test images.
#
#   scripts/iperf3-image.sh [--force]
set -euo pipefail

IMAGE="kisara-test/iperf3:latest"
HERE=$(cd "$(dirname "$0")" && pwd)
log() { echo "iperf3-image: $*" >&2; }

if [[ ${1:-} != --force ]] && docker image inspect "$IMAGE" >/dev/null 2>&1; then
    log "$IMAGE already present (use --force to rebuild)"
    exit 0
fi
if ! command -v iperf3 >/dev/null 2>&1; then
    if [[ $(id -u) -ne 0 ]]; then log "iperf3 is not installed and we are not root"; exit 1; fi
    log "installing iperf3"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq iperf3 >/dev/null
fi
command -v gcc >/dev/null 2>&1 || { log "gcc not found (apt-get install gcc libc6-dev)"; exit 1; }
[[ -x /bin/busybox ]] || { log "/bin/busybox missing: run scripts/test-images.sh first"; exit 1; }

ROOTFS=$(mktemp -d /tmp/kisara-iperf3-rootfs.XXXXXX)
trap 'rm -rf "$ROOTFS"' EXIT
mkdir -p "$ROOTFS"/{bin,tmp,etc}
IPERF=$(command -v iperf3)
install -m 0755 "$IPERF" "$ROOTFS/bin/iperf3"
# The libraries and the loader, at the paths the binary asks for.
for lib in $(ldd "$IPERF" | grep -o '/[^ ]*'); do
    mkdir -p "$ROOTFS$(dirname "$lib")"
    cp -L "$lib" "$ROOTFS$lib"
done
gcc -static -O2 -Wall -o "$ROOTFS/bin/kfix" "$HERE/fixtures/kfix.c"
install -m 0755 /bin/busybox "$ROOTFS/bin/busybox"
ln -s busybox "$ROOTFS/bin/sh"
echo 'root:x:0:0:root:/:/bin/sh' >"$ROOTFS/etc/passwd"
chmod 1777 "$ROOTFS/tmp"
tar -C "$ROOTFS" --numeric-owner --owner=0 --group=0 -c . \
    | docker import --change 'CMD ["/bin/iperf3", "-s"]' - "$IMAGE" >/dev/null
log "built $IMAGE"
