"""What the benchmark scripts share: the binary, arguments, ports, the API, processes.

Imported as `common` by the scripts next to it (`python3 bench/X.py` puts bench/ on the path).
"""
import argparse, json, os, socket, subprocess, time, urllib.error, urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The release build, unless $KISARA_BIN names another.
KISARA = os.environ.get("KISARA_BIN") or os.path.join(ROOT, "target", "release", "kisara")


def positional(doc, *spec):
    """Parses optional positional integers, `spec` being (name, default, help) triples; `--help`
    prints the script's docstring `doc`."""
    ap = argparse.ArgumentParser(description=doc,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, default, text in spec:
        ap.add_argument(name.lower(), metavar=name, type=int, nargs="?", default=default,
                        help=f"{text} (default {default})")
    return ap.parse_args()


def build_if_missing():
    """Builds the release binary when there is none (and $KISARA_BIN names none)."""
    if not os.path.exists(KISARA):
        subprocess.run(["cargo", "build", "--release", "-p", "kisara"], cwd=ROOT, check=True)


def free_port(kind=socket.SOCK_STREAM):
    s = socket.socket(socket.AF_INET, kind)
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def api(url, token, method, path, body=None, timeout=60):
    """One API call; the decoded JSON answer (None when empty). An HTTP error raises a
    RuntimeError naming the call and carrying the server's answer."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url + path, data=data, method=method)
    req.add_header("Authorization", "Bearer " + token)
    if data:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw = r.read()
            return json.loads(raw) if raw else None
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"{method} {path}: {e.code} {e.read().decode(errors='replace')}")


def rss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def answers(port, host="127.0.0.1"):
    """Whether the port answers an HTTP request now."""
    try:
        with socket.create_connection((host, port), timeout=1) as s:
            s.sendall(b"GET / HTTP/1.0\r\n\r\n")
            return s.recv(64).startswith(b"HTTP")
    except OSError:
        return False


def wait_http(port, deadline=20.0, every=0.005):
    """Polls every `every` seconds until the port answers HTTP (bounded)."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if answers(port):
            return
        time.sleep(every)
    raise RuntimeError(f"port {port} never answered")


def kisara_up(data_dir, port, config=None, **popen):
    """Starts `kisara up` on a data dir and a loopback port (logging warnings only)."""
    args = [KISARA, "up", "--data-dir", data_dir, "--listen", f"127.0.0.1:{port}"]
    if config:
        args += ["--config", config]
    popen.setdefault("stdout", subprocess.DEVNULL)
    return subprocess.Popen(args, env=dict(os.environ, KISARA_LOG="warn"), **popen)


def wait_ready(url, data_dir, proc, what="kisara", deadline=60.0):
    """Polls until the server in `data_dir` has a ready node; its admin token. Fails when
    `proc` exits first or the deadline passes."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            token = open(os.path.join(data_dir, "admin.token")).read().strip()
            nodes = api(url, token, "GET", "/v1/nodes")
            if any(n["state"] == "ready" for n in nodes["items"]):
                return token
        except Exception:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{what} never had a ready node")


def stop(proc, timeout=10):
    """Terminates a child process, killing it if it lingers."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def stop_kisara(proc, url, token, timeout=10):
    """Stops a Kisara this script started, then removes what it leaves on the engine: the warm
    pool's spare networks outlive a stop on purpose (the next start reuses them), but the
    script's data dir, which knows them, goes with the script."""
    try:
        nodes = [n["id"] for n in api(url, token, "GET", "/v1/nodes")["items"]] if token else []
    except Exception:
        nodes = []
    stop(proc, timeout)
    docker = lambda *a: subprocess.run(["docker", *a], capture_output=True, text=True).stdout
    clusters = set()
    for node in nodes:
        out = docker("network", "ls", "--filter", f"label=io.kisara.node={node}",
                     "--format", '{{.Label "io.kisara.cluster"}}')
        clusters.update(c for c in out.split() if c)
    for cluster in clusters:
        label = f"label=io.kisara.cluster={cluster}"
        for c in docker("ps", "-aq", "--filter", label).split():
            docker("rm", "-f", c)
        for n in docker("network", "ls", "-q", "--filter", label).split():
            docker("network", "rm", n)
