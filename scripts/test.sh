#!/usr/bin/env bash
# The one command that runs every test of Kisara, installing what the tests need first:
#   - cargo-nextest (when missing),
#   - Debian's busybox-static and the local test image kisara-test/busybox:latest,
#   - Debian's docker-registry (pull tests run one on loopback),
#   - a reachable Docker Engine (the tests need one; they fail, never skip, without it),
#   - root, dockerd and iproute2 for the multi-engine tests (scripts/testbed.sh).
# Then: formatting, clippy, and the whole test suite.
#
#   scripts/test.sh            everything
#   scripts/test.sh -- ARGS    extra arguments for `cargo nextest run` (e.g. a filter)
set -euo pipefail
cd "$(dirname "$0")/.."

log() { echo "test.sh: $*" >&2; }

if ! cargo nextest --version >/dev/null 2>&1; then
    log "installing cargo-nextest"
    cargo install --locked cargo-nextest
fi

if ! docker info >/dev/null 2>&1; then
    log "the Docker Engine is not reachable (DOCKER_HOST=${DOCKER_HOST:-unset}); trying to start it"
    if command -v systemctl >/dev/null 2>&1 && systemctl start docker 2>/dev/null; then :;
    elif command -v service >/dev/null 2>&1 && service docker start 2>/dev/null; then :;
    fi
    for _ in $(seq 1 30); do docker info >/dev/null 2>&1 && break; sleep 1; done
    docker info >/dev/null 2>&1 || { log "no Docker Engine: the integration tests cannot run"; exit 1; }
fi

scripts/test-images.sh

# Image pulls are tested against Debian's docker-registry, started by the tests on loopback.
if ! command -v docker-registry >/dev/null 2>&1; then
    log "installing docker-registry"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq docker-registry >/dev/null
fi

# The multi-engine tests (crates/kisara/tests/cluster.rs) start extra dockerds, each in a network
# namespace of its own, with scripts/testbed.sh: they need root, dockerd, iproute2 and nsenter.
# A missing piece is an error, never a skip.
[[ $(id -u) -eq 0 ]] || { log "the multi-engine tests need root (they start dockerd)"; exit 1; }
for tool in dockerd ip nsenter iptables flock; do
    command -v "$tool" >/dev/null 2>&1 || { log "$tool not found: the multi-engine tests need it"; exit 1; }
done
# Engines an interrupted earlier run left (engines a running test claims are left alone), and
# whatever a test killed by a timeout leaves this time.
scripts/testbed.sh down
trap 'scripts/testbed.sh down >/dev/null 2>&1 || true' EXIT

extra=()
if [[ "${1:-}" == "--" ]]; then shift; extra=("$@"); fi

log "cargo fmt --check"
cargo fmt --all -- --check
log "cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
log "doc tests"
cargo test --workspace --doc --locked
log "cargo nextest run"
cargo nextest run --workspace --locked --no-fail-fast "${extra[@]}"
