#!/usr/bin/env bash
# Builds the local test images Kisara's tests use. No registry is reachable on the test bed, so
# images are made from Debian's statically linked busybox and `docker import`ed.
#
#   scripts/test-images.sh           build what is missing
#   scripts/test-images.sh --force   rebuild even if the image exists
#
# Images:
#   kisara-test/udp-echo:latest  scripts/fixtures/kfix.c built static (UDP echo, TCP echo/sink/
#                                source) + busybox; see scripts/fixture-image.sh.
#   kisara-test/busybox:latest   /bin/busybox + applet links, /etc/passwd (root, nobody), /tmp,
#                                /www/index.html; CMD ["/bin/sh"].
# Mind: this busybox's `wget` segfaults; probe HTTP with
#   printf 'GET / HTTP/1.0\r\n\r\n' | nc -w 3 HOST PORT
set -euo pipefail

IMAGE="kisara-test/busybox:latest"
FORCE=0
for arg in "$@"; do
    case "$arg" in
        --force) FORCE=1 ;;
        -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
        *) echo "unknown argument: $arg" >&2; exit 2 ;;
    esac
done

log() { echo "test-images: $*" >&2; }

if ! command -v docker >/dev/null 2>&1; then
    log "docker CLI not found"; exit 1
fi
if ! docker info >/dev/null 2>&1; then
    log "cannot reach the Docker Engine (is dockerd running? DOCKER_HOST=${DOCKER_HOST:-unset})"; exit 1
fi

# The second image (UDP/TCP fixture, kisara-test/udp-echo) needs the busybox binary installed
# below; it is built after the busybox image, or here when that one is already present.
fixture_image() {
    if [[ $FORCE -eq 1 ]]; then "$(dirname "$0")/fixture-image.sh" --force; else "$(dirname "$0")/fixture-image.sh"; fi
}
if [[ $FORCE -eq 0 ]] && docker image inspect "$IMAGE" >/dev/null 2>&1; then
    log "$IMAGE already present (use --force to rebuild)"
    fixture_image
    exit 0
fi

# The image needs the static busybox: the dynamic one (package `busybox`) would not run in an
# empty rootfs without its libc.
if ! dpkg -s busybox-static >/dev/null 2>&1; then
    if [[ $(id -u) -ne 0 ]]; then
        log "busybox-static is not installed and we are not root; install it first"; exit 1
    fi
    log "installing busybox-static"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq busybox-static >/dev/null
fi
BUSYBOX=/bin/busybox
if [[ ! -x $BUSYBOX ]]; then
    log "$BUSYBOX missing even though busybox-static is installed"; exit 1
fi

ROOTFS=$(mktemp -d /tmp/kisara-busybox-rootfs.XXXXXX)
trap 'rm -rf "$ROOTFS"' EXIT

mkdir -p "$ROOTFS"/{bin,sbin,usr/bin,usr/sbin,etc,root,www,proc,sys,dev,var/run}
install -m 1777 -d "$ROOTFS/tmp"
install -m 0755 "$BUSYBOX" "$ROOTFS/bin/busybox"

# One symlink per applet, at the path busybox itself reports (bin/sh, usr/bin/nc, ...).
while IFS= read -r applet; do
    [[ -z $applet || $applet == bin/busybox ]] && continue
    mkdir -p "$ROOTFS/$(dirname "$applet")"
    [[ -e $ROOTFS/$applet || -L $ROOTFS/$applet ]] || ln -s /bin/busybox "$ROOTFS/$applet"
done < <("$BUSYBOX" --list-full)

cat >"$ROOTFS/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
EOF
cat >"$ROOTFS/etc/group" <<'EOF'
root:x:0:
nogroup:x:65534:
EOF
echo 'kisara-test' >"$ROOTFS/www/index.html"

OLD_ID=$(docker image inspect --format '{{.Id}}' "$IMAGE" 2>/dev/null || true)
log "importing $IMAGE"
tar -C "$ROOTFS" --numeric-owner --owner=0 --group=0 -c . \
    | docker import --change 'CMD ["/bin/sh"]' - "$IMAGE" >/dev/null
# A rebuild leaves the previous image untagged: drop it unless a container still uses it.
NEW_ID=$(docker image inspect --format '{{.Id}}' "$IMAGE")
if [[ -n $OLD_ID && $OLD_ID != "$NEW_ID" ]]; then
    docker image rm "$OLD_ID" >/dev/null 2>&1 || true
fi

# A quick self-check: the image must run a shell.
if [[ $(docker run --rm "$IMAGE" sh -c 'echo ok') != ok ]]; then
    log "$IMAGE does not run"; exit 1
fi
log "built $IMAGE"
fixture_image
