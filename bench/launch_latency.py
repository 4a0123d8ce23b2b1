#!/usr/bin/env python3
"""Launch-to-port latency: Kisara versus `docker run -d -p` on the same engine, interleaved.

Starts its own `kisara up` (release build) on a temporary data dir and a free loopback port,
then alternates, RUNS times each:
  * kisara-fresh   POST /v1/containers (a network of its own from the pool, the default)
  * kisara-shared  POST /v1/containers onto one pre-created network
  * docker-run     `docker run -d -p 127.0.0.1:PORT:80 ...` on the default bridge (the peer the
                   issue names)
  * docker-run-net the same onto a user-defined network (like for like: Kisara never uses the
                   default bridge, and joining a user-defined network costs the engine ~70 ms
                   more at start, for its embedded DNS)
and times each from the request until the published port accepts a TCP connection and answers
HTTP. Prints the medians and ratios, and the resident memory of the idle `kisara up`.

Usage: bench/launch_latency.py [RUNS]        (default 30; needs kisara-test/busybox:latest;
       target/release/kisara, built when missing, or $KISARA_BIN)
"""
import os, shutil, statistics, subprocess, tempfile, time

from common import api, build_if_missing, free_port, kisara_up, positional, rss_kb
from common import stop_kisara, wait_http, wait_ready

IMAGE = "kisara-test/busybox:latest"
CMD = ["httpd", "-f", "-p", "80", "-h", "/www"]


def main():
    RUNS = positional(__doc__, ("RUNS", 30, "rounds, each kind once per round")).runs
    build_if_missing()
    data = tempfile.mkdtemp(prefix="kisara-bench-")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = kisara_up(data, port)
    token = None
    try:
        token = wait_ready(url, data, proc, "kisara up", deadline=30)
        time.sleep(3)  # let start-up allocations settle before reading the idle footprint
        idle_rss = rss_kb(proc.pid)
        net = api(url, token, "POST", "/v1/networks", {"name": "bench-shared"})
        peer_net = f"bench-peer-{os.getpid()}"
        subprocess.run(["docker", "network", "create", peer_net], check=True, capture_output=True)
        samples = {"kisara-fresh": [], "kisara-shared": [], "docker-run": [], "docker-run-net": []}
        for i in range(RUNS):
            for kind in ("kisara-fresh", "docker-run", "kisara-shared", "docker-run-net"):
                if kind.startswith("docker-run"):
                    hp = free_port()
                    net_args = ["--network", peer_net] if kind == "docker-run-net" else []
                    t0 = time.monotonic()
                    cid = subprocess.run(["docker", "run", "-d", "-p", f"127.0.0.1:{hp}:80"] + net_args + [IMAGE] + CMD,
                                         check=True, capture_output=True, text=True).stdout.strip()
                    wait_http(hp, every=0.002)
                    samples[kind].append(time.monotonic() - t0)
                    subprocess.run(["docker", "rm", "-f", cid], check=True, capture_output=True)
                else:
                    body = {"image": IMAGE, "cmd": CMD, "ports": ["80/tcp"]}
                    if kind == "kisara-shared":
                        body["network"] = "bench-shared"
                    t0 = time.monotonic()
                    c = api(url, token, "POST", "/v1/containers", body)
                    wait_http(c["ports"][0]["public_port"], every=0.002)
                    samples[kind].append(time.monotonic() - t0)
                    api(url, token, "DELETE", f"/v1/containers/{c['id']}?force=true")
        api(url, token, "DELETE", f"/v1/networks/{net['id']}")
        subprocess.run(["docker", "network", "rm", peer_net], capture_output=True)
        med = {k: statistics.median(v) * 1000 for k, v in samples.items()}
        print(f"runs per kind: {RUNS} (interleaved)")
        for k, v in med.items():
            print(f"  median {k:14s} {v:8.1f} ms")
        print(f"  ratio kisara-fresh  / docker-run = {med['kisara-fresh'] / med['docker-run']:.2f}")
        print(f"  ratio kisara-shared / docker-run = {med['kisara-shared'] / med['docker-run']:.2f}")
        print(f"  ratio kisara-shared / docker-run-net = {med['kisara-shared'] / med['docker-run-net']:.2f}")
        print(f"  ratio kisara-fresh  / docker-run-net = {med['kisara-fresh'] / med['docker-run-net']:.2f}")
        print(f"  idle RSS of kisara up: {idle_rss / 1024:.1f} MiB")
    finally:
        stop_kisara(proc, url, token)
        shutil.rmtree(data, ignore_errors=True)


if __name__ == "__main__":
    main()
