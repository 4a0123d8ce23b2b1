#!/usr/bin/env python3
"""Multi-container services: Kisara versus docker-compose and Docker Swarm on the same engine.

A three-container challenge (web -> api -> db, busybox `httpd` and `nc -ll`, a healthcheck on
each, `depends_on: {condition: service_healthy}` down the chain, only web's port published).

1. Single launch (healthchecks every 1 s), interleaved RUNS times each, timed from the command until every container is
   healthy and web's published port answers HTTP:
     * kisara   POST /v1/services (answers once all are healthy), then the port answers
     * compose  `docker-compose -p NAME up -d` (Debian's 1.29), then poll `docker inspect`
                until all three are healthy and the port answers
2. Fifty team instances at once (healthchecks every 10 s, see below), timed until every instance's web port answers HTTP:
     * kisara   50 concurrent POST /v1/services
     * swarm    50 concurrent `docker stack deploy` (swarm on this one engine; ports published
                with mode=host and endpoint_mode=dnsrr, since the ingress mesh and VIPs need
                IPVS, which these kernels lack; stacks ignore depends_on)
   Everything is removed between phases.

Usage: bench/services.py [RUNS] [INSTANCES]   (default 10 and 50; needs kisara-test/busybox)
Starts its own `kisara up` (release build, made when missing, or $KISARA_BIN) on a temporary
data dir and a loopback port.
"""
import concurrent.futures as cf
import functools, os, shutil, signal, statistics, subprocess, sys, tempfile, time

import common
from common import build_if_missing, free_port, answers, kisara_up, positional, stop_kisara
from common import wait_ready

ARGS = positional(__doc__, ("RUNS", 10, "single launches of each kind"),
                  ("INSTANCES", 50, "instances launched at once"))
RUNS, INSTANCES = ARGS.runs, ARGS.instances
# Fifty services at once take a while to answer.
api = functools.partial(common.api, timeout=300)
FIFTY_INTERVAL = "10s"
# Written while this script's swarm exists: a run killed before its cleanup leaves the marker,
# and the next run leaves that swarm before anything else.
SWARM_MARKER = os.path.join(tempfile.gettempdir(), "kisara-bench-services.swarm")
# Swarm's own networks (ingress, overlays) from a range no Kisara pool or testbed engine uses.
SWARM_POOL = "10.196.0.0/16"

HEALTH = """    healthcheck:
      test: ["CMD-SHELL", "{test}"]
      interval: {interval}
      timeout: 2s
      retries: 60
"""
LIMITS = """    mem_limit: 32m
"""


def challenge(swarm=False, interval="1s"):
    """The compose file; the swarm variant publishes in host mode, resolves by DNS round
    robin (no VIP), and drops depends_on (stacks ignore it) and the compose-only limits."""
    web_ports = ('    ports: [{target: 80, mode: host}]\n' if swarm else '    ports: ["80"]\n')
    deploy = "    deploy: {endpoint_mode: dnsrr, resources: {limits: {memory: 32M}}}\n" if swarm else LIMITS
    dep = lambda s: "" if swarm else f"    depends_on: {{{s}: {{condition: service_healthy}}}}\n"
    img = "    image: kisara-test/busybox:latest\n"
    return ("services:\n"
            "  web:\n" + img +
            '    command: ["httpd", "-f", "-p", "80", "-h", "/www"]\n' + web_ports + dep("api") +
            HEALTH.format(interval=interval, test="printf 'GET / HTTP/1.0\\\\r\\\\n\\\\r\\\\n' | nc -w 2 127.0.0.1 80 | grep -q HTTP") + deploy +
            "  api:\n" + img +
            '    command: ["nc", "-ll", "-p", "8080", "-e", "sh", "-c", "echo api-ok; nc -w 2 db 5432"]\n' + dep("db") +
            HEALTH.format(interval=interval, test="nc -w 2 127.0.0.1 8080 </dev/null | grep -q api-ok") + deploy +
            "  db:\n" + img +
            '    command: ["nc", "-ll", "-p", "5432", "-e", "echo", "db-ok"]\n' +
            HEALTH.format(interval=interval, test="nc -w 2 127.0.0.1 5432 </dev/null | grep -q db-ok") + deploy)


def wait_http(port):
    common.wait_http(port, deadline=60.0)


def sh(*args, **kw):
    return subprocess.run(list(args), check=True, capture_output=True, text=True, **kw).stdout


def compose_once(path, project):
    t0 = time.monotonic()
    sh("docker-compose", "-f", path, "-p", project, "up", "-d")
    ids = sh("docker-compose", "-f", path, "-p", project, "ps", "-q").split()
    port = None
    end = time.monotonic() + 120
    while time.monotonic() < end:
        info = json.loads(sh("docker", "inspect", *ids))
        healthy = all(c["State"].get("Health", {}).get("Status") == "healthy" for c in info)
        for c in info:
            b = (c["NetworkSettings"]["Ports"] or {}).get("80/tcp")
            if b:
                port = int(b[0]["HostPort"])
        if healthy and port and answers(port):
            return time.monotonic() - t0
        time.sleep(0.02)
    raise RuntimeError(f"compose project {project} never came up healthy")


def kisara_once(url, token, text, owner):
    t0 = time.monotonic()
    s = api(url, token, "POST", "/v1/services", {"compose": text, "owner": owner, "module": "bench",
                                                 "health_timeout_secs": 600}, timeout=900)
    assert all(c["health"] == "healthy" for c in s["containers"]), s
    wait_http(s["ports"][0]["public_port"])
    return time.monotonic() - t0, s["id"]


def swarm_fifty(text, n):
    path = tempfile.mktemp(suffix=".yml")
    with open(path, "w") as f:
        f.write(text)
    stacks = [f"kbench{i}" for i in range(n)]
    t0 = time.monotonic()
    with cf.ThreadPoolExecutor(n) as ex:
        list(ex.map(lambda s: sh("docker", "stack", "deploy", "-c", path, s), stacks))
    pending = set(stacks)
    end = time.monotonic() + 600
    while pending and time.monotonic() < end:
        for s in list(pending):
            out = sh("docker", "ps", "-q", "--filter", f"label=com.docker.stack.namespace={s}",
                     "--filter", f"label=com.docker.swarm.service.name={s}_web")
            ids = out.split()
            if not ids:
                continue
            ports = json.loads(sh("docker", "inspect", ids[0]))[0]["NetworkSettings"]["Ports"] or {}
            b = ports.get("80/tcp")
            if b and answers(int(b[0]["HostPort"])):
                pending.discard(s)
        time.sleep(0.05)
    elapsed = time.monotonic() - t0
    if pending:
        raise RuntimeError(f"swarm stacks never answered: {sorted(pending)}")
    for s in stacks:
        subprocess.run(["docker", "stack", "rm", s], capture_output=True)
    os.unlink(path)
    return elapsed


def leave_swarm():
    subprocess.run(["docker", "swarm", "leave", "--force"], capture_output=True)
    try:
        os.unlink(SWARM_MARKER)
    except FileNotFoundError:
        pass


def main():
    # SIGTERM and SIGHUP unwind like Ctrl-C, so the cleanup below (swarm included) runs.
    def stop(signum, _frame):
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGHUP, stop)
    if os.path.exists(SWARM_MARKER):
        print("leaving the swarm a killed run of this script left", file=sys.stderr)
        for s in [f"kbench{i}" for i in range(INSTANCES)]:
            subprocess.run(["docker", "stack", "rm", s], capture_output=True)
        leave_swarm()
    build_if_missing()
    data = tempfile.mkdtemp(prefix="kisara-bench-")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # 150 containers at Kisara's default reservation of one core each on a small machine: the
    # ledger is told to overcommit cpu as far as the peers do (they reserve nothing).
    config = os.path.join(data, "kisara.toml")
    with open(config, "w") as f:
        f.write("[server]\ncpu_overcommit = 200.0\n")
    proc = kisara_up(data, port, config)
    text = challenge()
    # Fifty at once: 150 containers probed every second would cost this 2-core machine more
    # exec CPU than it has (each probe is a runc exec), so the fifty use a 10 s interval.
    text50 = challenge(interval=FIFTY_INTERVAL)
    cpath = os.path.join(data, "compose.yml")
    with open(cpath, "w") as f:
        f.write(text)
    swarm_started = False
    token = None
    try:
        token = wait_ready(url, data, proc, "kisara up", deadline=30)
        time.sleep(2)

        # 1. single launches, interleaved
        samples = {"kisara": [], "compose": []}
        for i in range(RUNS):
            dt, sid = kisara_once(url, token, text, f"single{i}")
            samples["kisara"].append(dt)
            api(url, token, "DELETE", f"/v1/services/{sid}")
            project = f"kbench{os.getpid()}x{i}"
            samples["compose"].append(compose_once(cpath, project))
            sh("docker-compose", "-f", cpath, "-p", project, "down", "-t", "1")
        med = {k: statistics.median(v) * 1000 for k, v in samples.items()}
        print(f"single launch to all-healthy + port answers, {RUNS} interleaved runs each:")
        for k, v in med.items():
            print(f"  median {k:8s} {v:8.0f} ms   (min {min(samples[k])*1000:.0f}, max {max(samples[k])*1000:.0f})")
        print(f"  ratio kisara / docker-compose = {med['kisara'] / med['compose']:.2f}")

        # 2. fifty at once: Kisara
        t0 = time.monotonic()
        with cf.ThreadPoolExecutor(INSTANCES) as ex:
            results = list(ex.map(lambda i: kisara_once(url, token, text50, f"team{i}"), range(INSTANCES)))
        kisara_all = time.monotonic() - t0
        for _, sid in results:
            api(url, token, "DELETE", f"/v1/services/{sid}")
        print(f"{INSTANCES} instances at once (healthcheck interval {FIFTY_INTERVAL}), until every one answers:")
        print(f"  kisara  {kisara_all:6.1f} s   (each all-healthy before it counts)")

        # 2. fifty at once: Swarm
        swarm_was = sh("docker", "info", "--format", "{{.Swarm.LocalNodeState}}").strip()
        if swarm_was != "active":
            open(SWARM_MARKER, "w").close()
            swarm_started = True
            sh("docker", "swarm", "init", "--advertise-addr", "127.0.0.1",
               "--default-addr-pool", SWARM_POOL)
        swarm_all = swarm_fifty(challenge(swarm=True, interval=FIFTY_INTERVAL), INSTANCES)
        print(f"  swarm   {swarm_all:6.1f} s   (web answers; stacks do not wait for health)")
        print(f"  ratio kisara / swarm = {kisara_all / swarm_all:.2f}")
    finally:
        # Whatever a failed run left: Kisara keeps containers across its own shutdown.
        try:
            for s in api(url, token, "GET", "/v1/services")["items"]:
                try:
                    api(url, token, "DELETE", f"/v1/services/{s['id']}")
                except Exception as e:
                    print(f"cleanup of {s['id']}: {e}", file=sys.stderr)
        except Exception as e:
            print(f"cleanup: {e}", file=sys.stderr)
        for s in [f"kbench{i}" for i in range(INSTANCES)] if swarm_started else []:
            subprocess.run(["docker", "stack", "rm", s], capture_output=True)
        if swarm_started:
            leave_swarm()
            left = sh("docker", "info", "--format", "{{.Swarm.LocalNodeState}}").strip()
            if left != "inactive":
                print(f"WARNING: the swarm is still {left}: run `docker swarm leave --force`",
                      file=sys.stderr)
        stop_kisara(proc, url, token)
        shutil.rmtree(data, ignore_errors=True)


if __name__ == "__main__":
    main()
