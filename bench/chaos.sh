#!/usr/bin/env bash
# Chaos bench (not CI): a Kisara server and three nodes on three real engines of the test bed
# (scripts/testbed.sh), then two faults.
#
#   bench/chaos.sh [BURST] [PAUSE_SECS]     defaults 200 and 60
#
# 1. Server crash mid-burst: BURST launches at once (`kisara run`, CONCURRENCY=40 at a time), the
#    server `kill -9`ed once a quarter of them were answered, restarted at once on the same data
#    dir. Once the nodes are back and reconciliation has settled (bounded wait), every labelled
#    container on the engines is compared with the server's list and with what it acknowledged:
#      orphaned  on an engine, unknown to the server            (target 0)
#      lost      listed or acknowledged, on no engine           (target 0)
#      launching rows still in `launching` after the settle     (target 0)
# 2. An agent cut off: node n2's agent is SIGSTOPped for PAUSE_SECS (its TCP connection stays
#    open, nothing answers), 10 launches happen meanwhile, then SIGCONT. Counted afterwards:
#      duplicates   Kisara ids on more than one engine, or listed twice      (target 0)
#      node.disconnect and node.connect events of n2 in that window, from GET /v1/events
#                   (target exactly 1 each), and n2's states seen by `kisara node ls` every second.
#
# Needs root, dockerd, iproute2, jq, curl, the test image (scripts/test-images.sh). Uses test bed
# engines 201-203 (KISARA_CHAOS_FIRST), claimed for the run, and the release binary
# (KISARA_BIN, default target/release/kisara, built when missing). All traffic stays on loopback
# and the engines' own namespaces. Logs are kept in the work dir it prints.
set -euo pipefail
cd "$(dirname "$0")/.."

BURST=${1:-200}
PAUSE=${2:-60}
CONCURRENCY=${CONCURRENCY:-40}
FIRST=${KISARA_CHAOS_FIRST:-201}
BIN=${KISARA_BIN:-target/release/kisara}
IMAGE=kisara-test/busybox:latest
N=3

log() { echo "chaos: $*" >&2; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }'; }
die() { log "error: $*"; exit 1; }

[[ $(id -u) -eq 0 ]] || die "must run as root"
for t in jq curl docker dockerd flock python3; do command -v "$t" >/dev/null || die "$t not found"; done
if [[ ! -x $BIN ]]; then
    log "building $BIN"
    cargo build --release -p kisara
fi
BIN=$(realpath "$BIN")

# Claim the engines for the run, so `testbed.sh down` elsewhere leaves them alone.
mkdir -p /run/kisara-testbed/claims
for ((k = 0; k < N; k++)); do
    exec {fd}>"/run/kisara-testbed/claims/engine-$((FIRST + k)).lock"
    flock -n "$fd" || die "engine $((FIRST + k)) is claimed by another run"
done
LAST=$((FIRST + N - 1))

WORK=$(mktemp -d /tmp/kisara-chaos.XXXXXX)
SERVER_PID=""
AGENT_PIDS=()
cleanup() {
    set +e
    [[ -n $SERVER_PID ]] && kill -9 "$SERVER_PID" 2>/dev/null
    for p in "${AGENT_PIDS[@]}"; do
        [[ -n $p ]] && { kill -CONT "$p"; kill -9 "$p"; } 2>/dev/null
    done
    wait 2>/dev/null
    scripts/testbed.sh down "$FIRST-$LAST" >/dev/null 2>&1 || log "testbed.sh down $FIRST-$LAST failed"
    log "logs in $WORK"
}
trap cleanup EXIT

scripts/testbed.sh up "$N" --first "$FIRST" >/dev/null

PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
URL=http://127.0.0.1:$PORT
DATA=$WORK/server

start_server() {
    KISARA_LOG=info "$BIN" server --data-dir "$DATA" --listen "127.0.0.1:$PORT" \
        </dev/null >>"$WORK/server.log" 2>&1 &
    SERVER_PID=$!
    local t
    for t in $(seq 1 150); do
        curl -fsS --max-time 1 "$URL/healthz" >/dev/null 2>&1 && return 0
        sleep 0.2
    done
    die "the server did not come up"
}

start_agent() { # k (0-based), extra args
    local k=$1 i=$((FIRST + $1))
    shift
    DOCKER_HOST=unix:///run/kisara-testbed/engine-$i.sock KISARA_LOG=info \
        "$BIN" node --server "$URL" --name "n$((k + 1))" --state-dir "$WORK/node-$k" \
        --public-address "10.198.$i.2" "$@" </dev/null >>"$WORK/agent-$k.log" 2>&1 &
    AGENT_PIDS[k]=$!
}

kc() { "$BIN" --url "$URL" --token "$TOKEN" "$@"; }

ready_count() { kc --json node ls 2>/dev/null | jq '[.items[] | select(.state == "ready")] | length' 2>/dev/null || echo 0; }

wait_ready() { # count, seconds
    local t
    for ((t = 0; t < $2 * 5; t++)); do
        [[ $(ready_count) -ge $1 ]] && return 0
        sleep 0.2
    done
    die "fewer than $1 nodes ready after $2 s"
}

# Kisara id of every labelled container on every engine, one per line (repeats = duplicates).
engine_ids() {
    local i
    for ((i = FIRST; i <= LAST; i++)); do
        docker -H "unix:///run/kisara-testbed/engine-$i.sock" ps -a --no-trunc \
            --filter label=io.kisara.container --format '{{.Label "io.kisara.container"}}'
    done
}

start_server
TOKEN=$(<"$DATA/admin.token")
JOIN=$(<"$DATA/join.token")
for ((c = 0; c < N; c++)); do start_agent "$c" --join-token "$JOIN"; done
wait_ready "$N" 60
log "server $URL, $N nodes ready on engines $FIRST-$LAST"

# ---- 1. server kill -9 mid-burst ------------------------------------------------------------
mkdir -p "$WORK/burst"
launch_one() {
    "$BIN" --url "$URL" --token "$TOKEN" --json run --owner chaos --cpus 0.05 --memory 16 \
        "$IMAGE" sleep 3600 >"$WORK/burst/$1.json" 2>"$WORK/burst/$1.err" || true
    touch "$WORK/burst/$1.done"
}
export -f launch_one
export BIN URL TOKEN IMAGE WORK
answered() { find "$WORK/burst" -name '*.json' -size +0 | wc -l; }
done_count() { find "$WORK/burst" -name '*.done' | wc -l; }

T0=$(date +%s.%N)
seq 1 "$BURST" | xargs -P "$CONCURRENCY" -I{} bash -c 'launch_one {}' &
XARGS=$!
KILL_AT=$((BURST / 4))
for ((t = 0; t < 3000; t++)); do
    [[ $(answered) -ge $KILL_AT ]] && break
    sleep 0.1
done
A_KILL=$(answered)
D_KILL=$(done_count)
kill -9 "$SERVER_PID"
wait "$SERVER_PID" 2>/dev/null || true
T_KILL=$(date +%s.%N)
start_server
T_UP=$(date +%s.%N)
log "server killed after $A_KILL answered ($D_KILL finished) of $BURST; back in $(elapsed "$T_KILL" "$T_UP") s"
for ((t = 0; t < 1200; t++)); do kill -0 "$XARGS" 2>/dev/null || break; sleep 0.5; done
kill -0 "$XARGS" 2>/dev/null && die "launches still running after 10 min"
wait "$XARGS" || true
T_END=$(date +%s.%N)
wait_ready "$N" 60

ACKED=$(find "$WORK/burst" -name '*.json' -size +0 -exec jq -r .id {} + 2>/dev/null | sort -u || true)
N_ACKED=$(grep -c . <<<"$ACKED" || true)
settle() {
    # One listing with --all: rows the server holds in any state (a `gone` row is known to it,
    # so its container is no orphan); without --all such rows were missing from the list and
    # their containers counted as orphaned. Lost counts only rows not `gone`.
    local all
    all=$(kc --json ps --all)
    KNOWN=$(jq -r '.items[].id' <<<"$all" | sort -u)
    LISTED=$(jq -r '.items[] | select(.state != "gone") | .id' <<<"$all" | sort -u)
    LAUNCHING=$(jq -r '.items[] | select(.state == "launching") | .id' <<<"$all" | sort -u)
    ON_ENGINES=$(engine_ids | sort)
    ORPHANED=$(comm -23 <(uniq <<<"$ON_ENGINES") <(echo "$KNOWN") | grep -c . || true)
    LOST=$(comm -23 <(sort -u <(echo "$LISTED") <(echo "$ACKED") | grep .) <(uniq <<<"$ON_ENGINES") | grep -c . || true)
    DUPS=$(uniq -d <<<"$ON_ENGINES" | grep -c . || true)
    N_LAUNCHING=$(grep -c . <<<"$LAUNCHING" || true)
}
for ((t = 0; t < 120; t++)); do
    settle
    [[ $ORPHANED -eq 0 && $LOST -eq 0 && $DUPS -eq 0 && $N_LAUNCHING -eq 0 ]] && break
    sleep 1
done
N_ENGINES=$(grep -c . <<<"$ON_ENGINES" || true)
N_LISTED=$(grep -c . <<<"$LISTED" || true)
FAILED=$(find "$WORK/burst" -name '*.err' -size +0 | wc -l)
printf 'burst: %d launches, %s s, server kill -9 after %d answered (%d finished), restarted in %s s\n' \
    "$BURST" "$(elapsed "$T0" "$T_END")" "$A_KILL" "$D_KILL" "$(elapsed "$T_KILL" "$T_UP")"
echo "burst: answered $N_ACKED, failed $FAILED; on engines $N_ENGINES, listed $N_LISTED (settled in ${t} s)"
echo "burst: orphaned $ORPHANED, lost $LOST, on two engines $DUPS, still launching $N_LAUNCHING (target 0 0 0 0)"
# Evidence for any orphan: its engine, state and creation time (the engines go at the end).
if [[ $ORPHANED -gt 0 ]]; then
    for kid in $(comm -23 <(uniq <<<"$ON_ENGINES") <(echo "$KNOWN")); do
        for ((i = FIRST; i <= LAST; i++)); do
            docker -H "unix:///run/kisara-testbed/engine-$i.sock" ps -a --no-trunc \
                --filter "label=io.kisara.container=$kid" \
                --format "burst: orphan $kid on engine $i: {{.State}} {{.Status}} created {{.CreatedAt}}"
        done
    done
    grep -h "$(comm -23 <(uniq <<<"$ON_ENGINES") <(echo "$KNOWN") | head -1)" "$WORK"/server.log "$WORK"/agent-*.log \
        2>/dev/null | tail -5 >&2 || true
fi

# ---- 2. an agent cut off for PAUSE seconds ----------------------------------------------------
SINCE=$(curl -sN --max-time 2 -H "Authorization: Bearer $TOKEN" "$URL/v1/events?kinds=node." |
    sed -n 's/^id: *//p' | tail -n1 || true)
SINCE=${SINCE:-0}
STATES=$WORK/n2-states
: >"$STATES"
(
    for ((s = 0; s < PAUSE + 90; s++)); do
        kc --json node ls 2>/dev/null | jq -r '.items[] | select(.name == "n2") | .state' >>"$STATES" || true
        sleep 1
    done
) &
WATCH=$!
BEFORE=$(engine_ids | sort)
kill -STOP "${AGENT_PIDS[1]}"
log "agent n2 stopped for $PAUSE s"
sleep $((PAUSE / 3))
PAUSE_LAUNCHED=0
for ((j = 0; j < 10; j++)); do
    kc --json run --owner chaos-pause --cpus 0.05 --memory 16 "$IMAGE" sleep 3600 >/dev/null 2>>"$WORK/pause.err" &&
        PAUSE_LAUNCHED=$((PAUSE_LAUNCHED + 1))
done
sleep $((PAUSE - PAUSE / 3))
kill -CONT "${AGENT_PIDS[1]}"
log "agent n2 continued"
for ((t = 0; t < 300; t++)); do
    [[ $(kc --json node ls 2>/dev/null | jq -r '.items[] | select(.name == "n2") | .state') == ready ]] && break
    sleep 0.2
done
sleep 10 # heartbeats and reconciliation after the return
kill "$WATCH" 2>/dev/null || true
wait "$WATCH" 2>/dev/null || true
AFTER=$(engine_ids | sort)
DUPS2=$(uniq -d <<<"$AFTER" | grep -c . || true)
LISTED_DUPS=$(kc --json ps | jq -r '.items[].id' | sort | uniq -d | grep -c . || true)
EVENTS=$(curl -sN --max-time 3 -H "Authorization: Bearer $TOKEN" \
    "$URL/v1/events?kinds=node.connect,node.disconnect&node=n2&since=$SINCE" | sed -n 's/^event: *//p' || true)
N_DISC=$(grep -cx 'node.disconnect' <<<"$EVENTS" || true)
N_CONN=$(grep -cx 'node.connect' <<<"$EVENTS" || true)
TRANSITIONS=$(uniq "$STATES" | paste -sd '>' -)
echo "pause: n2 SIGSTOP ${PAUSE} s; $PAUSE_LAUNCHED of 10 launches during it succeeded; containers on engines $(grep -c . <<<"$BEFORE") before, $(grep -c . <<<"$AFTER") after"
echo "pause: duplicates on engines $DUPS2, listed twice $LISTED_DUPS (target 0 0)"
echo "pause: events of n2: node.disconnect $N_DISC, node.connect $N_CONN (target 1 1); node ls states: $TRANSITIONS"
