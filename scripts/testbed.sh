#!/usr/bin/env bash
# Several real Docker Engines on this one machine, for Kisara's multi-node tests and the chaos bench.
#
#   scripts/testbed.sh up N [--first I] [--fresh]
#                                         start engines I..I+N-1 (I defaults to 1); engines already
#                                         up are kept (with --fresh: stopped and wiped first), stale
#                                         remains of dead ones are cleaned first
#   scripts/testbed.sh down [I|I-J ...]   stop these engines (default: every testbed engine here that
#                                         no running test claims) and remove all they made:
#                                         containers, networks, mounts, data
#   scripts/testbed.sh status [I|I-J ...] one line per engine: index, state, socket, node address
#
# Engine I (1..250) is a `dockerd` of its own:
#   socket    unix:///run/kisara-testbed/engine-I.sock   (DOCKER_HOST for its node agent)
#   pidfile   /run/kisara-testbed/engine-I.pid
#   exec-root /run/kisara-testbed/engine-I/    data-root /var/lib/kisara-testbed/engine-I/
#   log       /var/log/kisara-testbed/engine-I.log   (kept after `down`, for post-mortems)
#   netns     kisara-tbI: the engine runs in a network namespace of its own, reached from the host
#             over a veth pair: host side kisara-tbIh 10.198.I.1/24, engine side `uplink`
#             10.198.I.2/24 -- the node's address; ports it publishes answer there.
#   bridge    kisara-tbI (10.199.I.1/24, inside the namespace), given to dockerd with --bridge
#   pools     --default-address-pool base=10.197.I.0/24,size=28 (Kisara gives explicit subnets)
#   containerd namespace kisara-tbI; cgroup parent /kisara-tbI
#   claim     a test or bench using engine I holds an exclusive flock on
#             /run/kisara-testbed/claims/engine-I.lock; `down` without indices leaves it alone
#
# Why a network namespace per engine: a starting dockerd with --iptables flushes the DOCKER (nat and
# filter) and DOCKER-ISOLATION chains of its network namespace and re-adds only its own rules. On the
# host that would wipe the main engine's published-port DNAT and its network isolation (and that of
# every other testbed engine) each time an engine starts. Two dockerds starting together in one
# namespace also race on creating those chains ("Chain already exists"). In a namespace of its own
# each engine keeps its own iptables, routes and port space: no rule, subnet or published port of
# one engine can collide with another's or with the main engine's, and `down` leaves nothing
# behind on the host's iptables (deleting the namespace deletes its rules).
#
# Each engine starts with no images; the images in $KISARA_TESTBED_IMAGES (default
# kisara-test/busybox:latest, built by scripts/test-images.sh) are copied in from the main engine.
# Environment:
#   KISARA_TESTBED_CONTAINERD   containerd socket to share (default: /run/containerd/containerd.sock
#                               when a system containerd listens there, else each dockerd starts
#                               its own -- here the only containerd is the main dockerd's child)
#   KISARA_TESTBED_STORAGE_DRIVER   storage driver (default: dockerd's choice; overlay2 here)
# Needs root, dockerd, docker, iproute2, nsenter (util-linux), iptables. No docker-in-docker.
set -euo pipefail

RUN_DIR=/run/kisara-testbed
DATA_DIR=/var/lib/kisara-testbed
LOG_DIR=/var/log/kisara-testbed
LOCK=$RUN_DIR/.lock
CLAIMS=$RUN_DIR/claims
IMAGES=${KISARA_TESTBED_IMAGES:-kisara-test/busybox:latest}
START_TIMEOUT=30 # seconds for an engine to answer `docker info`
STOP_TIMEOUT=20  # seconds for an engine to exit after SIGTERM

log() { echo "testbed: $*" >&2; }
die() { log "error: $*"; exit 1; }

usage() { sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; }

sock() { echo "$RUN_DIR/engine-$1.sock"; }
pidfile() { echo "$RUN_DIR/engine-$1.pid"; }
exec_root() { echo "$RUN_DIR/engine-$1"; }
data_root() { echo "$DATA_DIR/engine-$1"; }
netns() { echo "kisara-tb$1"; }
host_if() { echo "kisara-tb$1h"; }
node_addr() { echo "10.198.$1.2"; }
dk() { local i=$1; shift; docker -H "unix://$(sock "$i")" "$@"; }

need_tools() {
    [[ $(id -u) -eq 0 ]] || die "must run as root (it starts dockerd and makes network namespaces)"
    local t
    for t in dockerd docker ip nsenter iptables setsid timeout flock; do
        command -v "$t" >/dev/null 2>&1 || die "$t not found (dockerd: Debian's docker.io; ip: iproute2)"
    done
}

# Parses engine indices: N, I-J. Prints one index per line.
parse_indices() {
    local a lo hi i
    for a in "$@"; do
        if [[ $a =~ ^([0-9]+)-([0-9]+)$ ]]; then
            lo=${BASH_REMATCH[1]} hi=${BASH_REMATCH[2]}
        elif [[ $a =~ ^[0-9]+$ ]]; then
            lo=$a hi=$a
        else
            die "not an engine index or range: $a"
        fi
        for ((i = 10#$lo; i <= 10#$hi; i++)); do
            ((i >= 1 && i <= 250)) || die "engine index $i out of 1..250"
            echo "$i"
        done
    done
}

# Every engine with something left on this machine: a pidfile, a namespace, a data root, a link.
known_indices() {
    {
        compgen -G "$RUN_DIR/engine-*.pid" | sed -E 's/.*engine-([0-9]+)\.pid$/\1/' || true
        compgen -G "$DATA_DIR/engine-*" | sed -E 's/.*engine-([0-9]+)$/\1/' || true
        ip netns list 2>/dev/null | sed -nE 's/^kisara-tb([0-9]+)( .*)?$/\1/p' || true
        ip -o link show 2>/dev/null | sed -nE 's/^[0-9]+: kisara-tb([0-9]+)h[@:].*/\1/p' || true
    } | grep -E '^[0-9]+$' | sort -nu
}

pid_of() {
    local f pid
    f=$(pidfile "$1")
    [[ -f $f ]] || return 1
    pid=$(<"$f")
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    # The pid must still be this engine's dockerd, not a recycled pid.
    { tr '\0' ' ' <"/proc/$pid/cmdline"; } 2>/dev/null | grep -q -- "--pidfile $f" || return 1
    echo "$pid"
}

# An engine is claimed while some process holds an exclusive lock on its claim file (the Rust
# test helper and bench/chaos.sh take one per engine they use).
claimed() {
    local f="$CLAIMS/engine-$1.lock"
    [[ -f $f ]] || return 1
    ! flock -n "$f" true 2>/dev/null
}

answers() { timeout 5 docker -H "unix://$(sock "$1")" info >/dev/null 2>&1; }

containerd_sock() {
    if [[ -n ${KISARA_TESTBED_CONTAINERD:-} ]]; then
        echo "$KISARA_TESTBED_CONTAINERD"
    elif [[ -S /run/containerd/containerd.sock ]]; then
        echo /run/containerd/containerd.sock
    fi
}

# The engine's network: namespace, veth to the host, the bridge dockerd gets with --bridge.
make_network() {
    local i=$1 ns hif
    ns=$(netns "$i") hif=$(host_if "$i")
    ip netns add "$ns"
    ip -n "$ns" link set lo up
    ip link add "$hif" type veth peer name uplink netns "$ns"
    ip addr add "10.198.$i.1/24" dev "$hif"
    ip link set "$hif" up
    ip -n "$ns" addr add "$(node_addr "$i")/24" dev uplink
    ip -n "$ns" link set uplink up
    ip -n "$ns" link add "kisara-tb$i" type bridge
    ip -n "$ns" addr add "10.199.$i.1/24" dev "kisara-tb$i"
    ip -n "$ns" link set "kisara-tb$i" up
}

start_engine() {
    local i=$1 ns cd args=()
    ns=$(netns "$i")
    mkdir -p "$(exec_root "$i")" "$(data_root "$i")" "$LOG_DIR"
    # An empty config file of its own: the main engine's /etc/docker/daemon.json names a
    # data-root, which dockerd refuses beside --data-root.
    echo '{}' >"$(exec_root "$i").json"
    args=(
        --config-file "$(exec_root "$i").json"
        --data-root "$(data_root "$i")"
        --exec-root "$(exec_root "$i")"
        --pidfile "$(pidfile "$i")"
        -H "unix://$(sock "$i")"
        --bridge "kisara-tb$i"
        --containerd-namespace "kisara-tb$i"
        --containerd-plugins-namespace "kisara-tb$i-plugins"
        --default-address-pool "base=10.197.$i.0/24,size=28"
        --cgroup-parent "/kisara-tb$i"
        --iptables=true
        --shutdown-timeout 3
        --log-level warn
    )
    cd=$(containerd_sock)
    [[ -n $cd ]] && args+=(--containerd "$cd")
    [[ -n ${KISARA_TESTBED_STORAGE_DRIVER:-} ]] && args+=(--storage-driver "$KISARA_TESTBED_STORAGE_DRIVER")
    # nsenter, not `ip netns exec`: the latter also makes a mount namespace with a fresh /sys,
    # where dockerd finds no cgroups ("Devices cgroup isn't mounted").
    setsid nsenter --net="/run/netns/$ns" -- dockerd "${args[@]}" \
        </dev/null >"$LOG_DIR/engine-$i.log" 2>&1 &
}

wait_engine() {
    local i=$1 deadline=$((SECONDS + START_TIMEOUT))
    until answers "$i"; do
        if ((SECONDS >= deadline)); then
            log "engine $i did not answer within ${START_TIMEOUT}s; last lines of $LOG_DIR/engine-$i.log:"
            tail -n 15 "$LOG_DIR/engine-$i.log" >&2 || true
            return 1
        fi
        sleep 0.2
    done
}

# Unmounts everything below a path, deepest first (overlay2 merged dirs, netns files, shm).
unmount_below() {
    local dir=$1 m
    while read -r m; do
        umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || log "cannot unmount $m"
    done < <(awk -v d="$dir" '$2 == d || index($2, d "/") == 1 { print $2 }' /proc/self/mounts | sort -r)
}

# Kills what is left in the engine's cgroups (containers whose engine died) and removes them.
sweep_cgroups() {
    local i=$1 procs d
    for procs in /sys/fs/cgroup/*/"kisara-tb$i"/*/cgroup.procs /sys/fs/cgroup/"kisara-tb$i"/*/cgroup.procs; do
        [[ -f $procs ]] || continue
        xargs -r kill -9 <"$procs" 2>/dev/null || true
    done
    for d in /sys/fs/cgroup/*/"kisara-tb$i" /sys/fs/cgroup/"kisara-tb$i"; do
        [[ -d $d ]] || continue
        local t
        for t in $(seq 1 20); do
            find "$d" -depth -type d -exec rmdir {} + 2>/dev/null || true
            [[ -d $d ]] || break
            sleep 0.1
        done
        [[ -d $d ]] && log "cgroup $d still busy"
    done
    return 0
}

stop_engine() {
    local i=$1 pid cpid ns t
    ns=$(netns "$i")
    if pid=$(pid_of "$i"); then
        if answers "$i"; then
            # Containers and networks first, while the engine can still tidy its own state.
            local ids
            ids=$(timeout 20 docker -H "unix://$(sock "$i")" ps -aq 2>/dev/null || true)
            if [[ -n $ids ]]; then
                # shellcheck disable=SC2086
                timeout 60 docker -H "unix://$(sock "$i")" rm -f $ids >/dev/null 2>&1 || true
            fi
            timeout 20 docker -H "unix://$(sock "$i")" network prune -f >/dev/null 2>&1 || true
        fi
        kill -TERM "$pid" 2>/dev/null || true
        for t in $(seq 1 $((STOP_TIMEOUT * 5))); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.2
        done
        if kill -0 "$pid" 2>/dev/null; then
            log "engine $i (pid $pid) did not stop within ${STOP_TIMEOUT}s; killing it"
            kill -KILL "$pid" 2>/dev/null || true
            sleep 0.2
        fi
    fi
    # dockerd's own containerd, when it started one.
    local cpf
    cpf="$(exec_root "$i")/containerd/containerd.pid"
    if [[ -f $cpf ]]; then
        cpid=$(<"$cpf")
        if [[ $cpid =~ ^[0-9]+$ ]] && { tr '\0' ' ' <"/proc/$cpid/cmdline"; } 2>/dev/null | grep -q "$(exec_root "$i")/"; then
            kill -TERM "$cpid" 2>/dev/null || true
            for t in $(seq 1 25); do kill -0 "$cpid" 2>/dev/null || break; sleep 0.2; done
            kill -KILL "$cpid" 2>/dev/null || true
        fi
    fi
    sweep_cgroups "$i"
    # Anything else still running in the engine's namespace: docker-proxy, shims.
    if ip netns list 2>/dev/null | grep -qE "^$ns( |$)"; then
        local p
        for p in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$p" 2>/dev/null || true; done
    fi
    unmount_below "$(exec_root "$i")"
    unmount_below "$(data_root "$i")"
    # A shared containerd keeps the engine's (now empty) namespace.
    local cd
    cd=$(containerd_sock)
    if [[ -n $cd ]] && command -v ctr >/dev/null 2>&1; then
        ctr -a "$cd" namespaces rm "kisara-tb$i" "kisara-tb$i-plugins" >/dev/null 2>&1 || true
    fi
    ip link del "$(host_if "$i")" 2>/dev/null || true
    ip netns del "$ns" 2>/dev/null || true
    rm -rf "$(exec_root "$i")" "$(exec_root "$i").json" "$(sock "$i")" "$(pidfile "$i")"
    rm -rf "$(data_root "$i")"
    # Whatever survived is reported, not hidden.
    local left
    left=$(awk -v a="$(exec_root "$i")" -v b="$(data_root "$i")" \
        'index($2, a) == 1 || index($2, b) == 1 { print $2 }' /proc/self/mounts)
    [[ -z $left ]] || log "engine $i: mounts left behind: $left"
    return 0
}

load_images() {
    local tar=$1 i=$2
    timeout 120 docker -H "unix://$(sock "$i")" load -q -i "$tar" >/dev/null ||
        die "could not load $IMAGES into engine $i"
}

cmd_up() {
    local n="" first=1 fresh=0
    while (($#)); do
        case $1 in
            --first) first=${2:?--first needs an index}; shift 2 ;;
            --fresh) fresh=1; shift ;;
            -h | --help) usage; exit 0 ;;
            *) [[ -z $n ]] || die "up takes one count"; n=$1; shift ;;
        esac
    done
    [[ $n =~ ^[0-9]+$ && $n -ge 1 ]] || die "usage: testbed.sh up N [--first I] [--fresh]"
    [[ $first =~ ^[0-9]+$ ]] || die "--first takes an index"
    need_tools
    local img
    for img in $IMAGES; do
        docker image inspect "$img" >/dev/null 2>&1 ||
            die "$img is not on the main engine (run scripts/test-images.sh)"
    done
    mkdir -p "$RUN_DIR" "$DATA_DIR" "$LOG_DIR"
    local indices=() i started=()
    mapfile -t indices < <(parse_indices "$first-$((first + n - 1))")

    local tar
    tar=$(mktemp /tmp/kisara-testbed-images.XXXXXX.tar)
    # shellcheck disable=SC2064
    trap "rm -f '$tar'" EXIT
    # shellcheck disable=SC2086
    docker save -o "$tar" $IMAGES

    # Network set-up and starts under one lock, so parallel callers do not race on /run/netns.
    exec 9>"$LOCK"
    flock -w 120 9 || die "another testbed.sh holds $LOCK"
    for i in "${indices[@]}"; do
        if ((fresh == 0)) && pid_of "$i" >/dev/null && answers "$i"; then
            log "engine $i already up"
            continue
        fi
        if [[ -n $(known_indices | grep -x "$i" || true) ]]; then
            ((fresh)) || log "engine $i: cleaning up what a previous run left"
            stop_engine "$i"
        fi
        make_network "$i"
        start_engine "$i"
        started+=("$i")
    done
    flock -u 9

    local failed=0
    for i in "${started[@]}"; do
        wait_engine "$i" || failed=1
    done
    if ((failed)); then
        for i in "${started[@]}"; do stop_engine "$i"; done
        die "some engines did not start"
    fi
    for i in "${indices[@]}"; do load_images "$tar" "$i"; done
    for i in "${indices[@]}"; do
        echo "engine $i up: DOCKER_HOST=unix://$(sock "$i") address $(node_addr "$i")"
    done
}

cmd_down() {
    need_tools
    local indices=() i
    if (($#)); then
        mapfile -t indices < <(parse_indices "$@")
    else
        # Every engine here, except those a running test or bench still claims.
        for i in $(known_indices); do
            if claimed "$i"; then
                log "engine $i is claimed by a running test (${CLAIMS}/engine-$i.lock); leaving it"
            else
                indices+=("$i")
            fi
        done
    fi
    if ((${#indices[@]} == 0)); then
        log "no testbed engines to stop"
        return 0
    fi
    mkdir -p "$RUN_DIR"
    # In parallel: a dockerd takes ~2.5 s to shut down (it waits for its containerd).
    local pids=()
    for i in "${indices[@]}"; do
        (stop_engine "$i" && log "engine $i down") &
        pids+=($!)
    done
    local p failed=0
    for p in "${pids[@]}"; do wait "$p" || failed=1; done
    ((failed == 0)) || die "some engines could not be stopped cleanly"
}

cmd_status() {
    local indices=() i state pid containers
    if (($#)); then
        mapfile -t indices < <(parse_indices "$@")
    else
        mapfile -t indices < <(known_indices)
    fi
    if ((${#indices[@]} == 0)); then
        echo "no testbed engines"
        return 0
    fi
    for i in "${indices[@]}"; do
        pid=$(pid_of "$i" || true)
        containers=-
        if [[ -z $pid ]]; then
            state=down
        elif answers "$i"; then
            state=up
            containers=$(dk "$i" ps -q | wc -l)
        else
            state=not-answering
        fi
        claimed "$i" && state+=",claimed"
        printf 'engine %-3s %-21s pid=%-7s containers=%-4s DOCKER_HOST=unix://%s address=%s\n' \
            "$i" "$state" "${pid:--}" "$containers" "$(sock "$i")" "$(node_addr "$i")"
    done
}

case ${1:-} in
    up) shift; cmd_up "$@" ;;
    down) shift; cmd_down "$@" ;;
    status) shift; cmd_status "$@" ;;
    -h | --help | help) usage ;;
    *) usage >&2; exit 2 ;;
esac
