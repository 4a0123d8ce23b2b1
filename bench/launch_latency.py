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

Usage: bench/launch_latency.py [RUNS]        (default 30; needs kisara-test/busybox:latest)
"""
import json, os, shutil, socket, statistics, subprocess, sys, tempfile, time, urllib.request

RUNS = int(sys.argv[1]) if len(sys.argv) > 1 else 30
IMAGE = "kisara-test/busybox:latest"
CMD = ["httpd", "-f", "-p", "80", "-h", "/www"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KISARA = os.path.join(ROOT, "target", "release", "kisara")


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def wait_http(port, deadline=20.0):
    """Polls until the port answers an HTTP request (bounded)."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"GET / HTTP/1.0\r\n\r\n")
                if s.recv(64):
                    return True
        except OSError:
            pass
        time.sleep(0.002)
    raise RuntimeError(f"port {port} never answered")


def api(url, token, method, path, body=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url + path, data=data, method=method)
    req.add_header("Authorization", "Bearer " + token)
    if data:
        req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=60) as r:
        raw = r.read()
        return json.loads(raw) if raw else None


def rss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def main():
    if not os.path.exists(KISARA):
        subprocess.run(["cargo", "build", "--release", "-p", "kisara"], cwd=ROOT, check=True)
    data = tempfile.mkdtemp(prefix="kisara-bench-")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ, KISARA_LOG="warn")
    proc = subprocess.Popen([KISARA, "up", "--data-dir", data, "--listen", f"127.0.0.1:{port}"],
                            env=env, stdout=subprocess.DEVNULL)
    try:
        end = time.monotonic() + 30
        token = None
        while time.monotonic() < end:
            try:
                token = open(os.path.join(data, "admin.token")).read().strip()
                nodes = api(url, token, "GET", "/v1/nodes")
                if any(n["state"] == "ready" for n in nodes["items"]):
                    break
            except Exception:
                pass
            time.sleep(0.05)
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
                    wait_http(hp)
                    samples[kind].append(time.monotonic() - t0)
                    subprocess.run(["docker", "rm", "-f", cid], check=True, capture_output=True)
                else:
                    body = {"image": IMAGE, "cmd": CMD, "ports": ["80/tcp"]}
                    if kind == "kisara-shared":
                        body["network"] = "bench-shared"
                    t0 = time.monotonic()
                    c = api(url, token, "POST", "/v1/containers", body)
                    wait_http(c["ports"][0]["public_port"])
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
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(data, ignore_errors=True)


if __name__ == "__main__":
    main()
