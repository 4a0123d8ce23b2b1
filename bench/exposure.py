#!/usr/bin/env python3
"""Public port exposure (issue #5): straight to the container vs Kisara's gateway vs rathole.

Starts its own `kisara up` (release build; gateway role on, its local node reached directly,
as `kisara up` does) and, optionally, a `kisara server` + `kisara agent` pair in separate
processes so the gateway carries visitors through the agent's tunnel. One container
(kisara-test/iperf3: iperf3 server on 5201, kfix TCP and UDP echo on 7) is launched per
Kisara with all four ports exposed in gateway mode; rathole (server and client, on loopback)
is configured for the same container ports. Then, interleaved, ROUNDS times:

  * TCP throughput   iperf3 -c HOST -p PORT -t SECS            (receiver's rate)
  * UDP throughput   iperf3 -c HOST -p PORT -u -b 0 -l 1400     (receiver's rate, loss)
  * TCP latency      request/response of 64 bytes on one connection, p50/p99
  * UDP latency      the same with datagrams

for each path: `direct` (the container's private address), `gateway` (kisara up), `tunnel`
(the gateway through the agent's data connection, when --tunnel), `rathole`. Then holds
1,000 concurrent TCP connections through the gateway and through rathole and reads the
resident memory of each process.

Usage: bench/exposure.py [--rounds N] [--secs S] [--conns C] [--tunnel]
Needs: iperf3, rathole (`cargo install rathole`), scripts/test-images.sh and
scripts/iperf3-image.sh (run here when the image is missing).
"""
import argparse, json, os, random, resource, shutil, socket, statistics, subprocess, sys
import tempfile, time

from common import KISARA, ROOT, api, build_if_missing, free_port, kisara_up, rss_kb, stop
from common import stop_kisara, wait_ready

RATHOLE = shutil.which("rathole") or os.path.expanduser("~/.cargo/bin/rathole")
IMAGE = "kisara-test/iperf3:latest"
CMD = ["sh", "-c", "kfix tcp-echo 7 & kfix udp-echo 7 & exec iperf3 -s -p 5201"]
PORTS = ["5201/tcp", "5201/udp", "7/tcp", "7/udp"]


def free_block(n):
    """A run of n consecutive ports free for TCP and UDP on loopback (bounded search)."""
    for _ in range(200):
        base = random.randrange(21000, 29000)
        ok = True
        for p in range(base, base + n):
            for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
                s = socket.socket(socket.AF_INET, kind)
                try:
                    s.bind(("127.0.0.1", p))
                except OSError:
                    ok = False
                finally:
                    s.close()
        if ok:
            return base
    raise RuntimeError("no free port block")


def wait_tcp(host, port, deadline=20.0):
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        try:
            with socket.create_connection((host, port), timeout=1) as s:
                s.sendall(b"ping")
                s.settimeout(1)
                if s.recv(4):
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{host}:{port} never echoed")


def iperf(host, port, secs, udp):
    args = ["iperf3", "-c", host, "-p", str(port), "-t", str(secs), "-J"]
    if udp:
        args += ["-u", "-b", "0", "-l", "1400"]
    for attempt in range(3):
        r = subprocess.run(args, capture_output=True, text=True, timeout=secs + 30)
        try:
            j = json.loads(r.stdout)
        except json.JSONDecodeError:
            j = {"error": r.stderr.strip() or "no output"}
        if "error" not in j:
            break
        time.sleep(1)  # iperf3's server is busy with the previous run's end
    else:
        raise RuntimeError(f"iperf3 to {host}:{port}: {j['error']}")
    end = j["end"]
    if udp:
        # What arrived at the container's iperf3 (the sender offers as much as it can).
        s = end.get("sum_received") or end["sum"]
        return s["bits_per_second"], s.get("lost_percent", 0)
    return end["sum_received"]["bits_per_second"], 0.0


def tcp_latency(host, port, n):
    msg = b"x" * 64
    out = []
    with socket.create_connection((host, port), timeout=5) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(n):
            t0 = time.perf_counter()
            s.sendall(msg)
            got = 0
            while got < len(msg):
                b = s.recv(len(msg) - got)
                if not b:
                    raise RuntimeError("echo closed")
                got += len(b)
            out.append(time.perf_counter() - t0)
    return out


def udp_latency(host, port, n):
    msg = b"y" * 64
    out = []
    lost = 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((host, port))
        s.settimeout(1.0)
        for _ in range(n):
            t0 = time.perf_counter()
            s.send(msg)
            try:
                s.recv(2048)
                out.append(time.perf_counter() - t0)
            except socket.timeout:
                lost += 1
    if lost > n // 10:
        raise RuntimeError(f"UDP echo at {host}:{port}: {lost} of {n} lost")
    return out


def pct(v, p):
    v = sorted(v)
    return v[min(len(v) - 1, int(len(v) * p / 100))]


def hold_connections(port, n):
    """Opens n connections to an echo at 127.0.0.1:port, each echoing once (so every one
    reaches the container); returns the sockets."""
    socks = []
    for i in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        socks.append(s)
    for s in socks:
        s.sendall(b"k")
    for s in socks:
        s.settimeout(10)
        if s.recv(1) != b"k":
            raise RuntimeError("a held connection did not echo")
    return socks


class Kisara:
    """A `kisara up`, or a `kisara server` + `kisara agent` pair (tunnel)."""

    def __init__(self, tunnel, gw_base):
        self.tunnel = tunnel
        self.data = tempfile.mkdtemp(prefix="kisara-bench-exp-")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cfg = os.path.join(self.data, "kisara.toml")
        with open(cfg, "w") as f:
            f.write(f"""
[server]
limits.max_pids_limit = 4096

[gateway]
enabled = true
listen_host = "127.0.0.1"
public_address = "127.0.0.1"
port_range = "{gw_base}-{gw_base + 9}"
""")
        env = dict(os.environ, KISARA_LOG="warn")
        self.procs = []
        if tunnel:
            self.procs.append(subprocess.Popen(
                [KISARA, "server", "--data-dir", self.data, "--listen", f"127.0.0.1:{self.port}",
                 "--config", cfg], env=env, stdout=subprocess.DEVNULL))
            end = time.monotonic() + 30
            while not os.path.exists(os.path.join(self.data, "join.token")):
                if time.monotonic() > end:
                    raise RuntimeError("kisara server wrote no join token")
                time.sleep(0.1)
            time.sleep(0.2)
            join = open(os.path.join(self.data, "join.token")).read().strip()
            self.procs.append(subprocess.Popen(
                [KISARA, "node", "--server", self.url, "--join-token", join, "--name", "tunnelled",
                 "--state-dir", os.path.join(self.data, "node")], env=env,
                stdout=subprocess.DEVNULL))
        else:
            self.procs.append(kisara_up(self.data, self.port, cfg))
        self.token = wait_ready(self.url, self.data, self.procs[0], "kisara")
        self.container = api(self.url, self.token, "POST", "/v1/containers", {
            "image": IMAGE, "cmd": CMD, "ports": PORTS, "expose": "gateway",
            "cpus": 2.0, "pids_limit": 4096, "memory_mb": 1024, "owner": "bench"})
        pub = {(p["container_port"], p["protocol"]): p["public_port"]
               for p in self.container["ports"]}
        self.iperf_port = pub[(5201, "tcp")]
        if pub[(5201, "udp")] != self.iperf_port:
            raise RuntimeError(f"iperf3 needs its TCP and UDP public ports equal: {pub}")
        self.echo_tcp = pub[(7, "tcp")]
        self.echo_udp = pub[(7, "udp")]
        self.ip = self.container["ip_address"]

    def stop(self):
        try:
            api(self.url, self.token, "DELETE", f"/v1/containers/{self.container['id']}?force=true")
        except Exception as e:
            print(f"cleanup: {e}", file=sys.stderr)
        # The agent first (its node is what leaves spares), then the server with the cleanup.
        for p in reversed(self.procs[1:]):
            stop(p)
        stop_kisara(self.procs[0], self.url, self.token)
        shutil.rmtree(self.data, ignore_errors=True)


class Rathole:
    def __init__(self, target_ip, base):
        self.dir = tempfile.mkdtemp(prefix="kisara-bench-rathole-")
        ctrl = free_port()
        self.iperf_port, self.echo_port = base, base + 1
        # name, protocol, public port, container port
        services = [("iperf_tcp", "tcp", self.iperf_port, 5201),
                    ("iperf_udp", "udp", self.iperf_port, 5201),
                    ("echo_tcp", "tcp", self.echo_port, 7),
                    ("echo_udp", "udp", self.echo_port, 7)]
        server = f'[server]\nbind_addr = "127.0.0.1:{ctrl}"\ndefault_token = "bench"\n' + "".join(
            f'[server.services.{n}]\ntype = "{kind}"\nbind_addr = "127.0.0.1:{public}"\n'
            for n, kind, public, _ in services)
        client = f'[client]\nremote_addr = "127.0.0.1:{ctrl}"\ndefault_token = "bench"\n' + "".join(
            f'[client.services.{n}]\ntype = "{kind}"\nlocal_addr = "{target_ip}:{port}"\n'
            for n, kind, _, port in services)
        env = dict(os.environ, RUST_LOG="error")
        self.procs = []
        for role, text in (("server", server), ("client", client)):
            path = os.path.join(self.dir, f"{role}.toml")
            with open(path, "w") as f:
                f.write(text)
            self.procs.append(subprocess.Popen([RATHOLE, f"--{role}", path], env=env,
                                               stdout=subprocess.DEVNULL,
                                               stderr=subprocess.DEVNULL))
        self.server, self.client = self.procs
        wait_tcp("127.0.0.1", self.echo_port)

    def stop(self):
        for p in (self.client, self.server):
            stop(p)
        shutil.rmtree(self.dir, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--secs", type=int, default=3)
    ap.add_argument("--pings", type=int, default=2000)
    ap.add_argument("--conns", type=int, default=1000)
    ap.add_argument("--tunnel", action="store_true",
                    help="also measure the gateway through a separate agent's tunnel")
    args = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4 * args.conns + 1024)), hard))
    build_if_missing()
    if not os.path.exists(RATHOLE):
        sys.exit("rathole not found: cargo install rathole")
    subprocess.run([os.path.join(ROOT, "scripts", "iperf3-image.sh")], check=True)

    started = []
    try:
        up = Kisara(False, free_block(10))
        started.append(up)
        paths = {}
        paths["direct"] = dict(host=up.ip, iperf=5201, echo_tcp=7, echo_udp=7)
        paths["gateway"] = dict(host="127.0.0.1", iperf=up.iperf_port, echo_tcp=up.echo_tcp,
                                echo_udp=up.echo_udp)
        if args.tunnel:
            tun = Kisara(True, free_block(10))
            started.append(tun)
            paths["tunnel"] = dict(host="127.0.0.1", iperf=tun.iperf_port, echo_tcp=tun.echo_tcp,
                                   echo_udp=tun.echo_udp)
        rh = Rathole(up.ip, free_block(2))
        started.append(rh)
        paths["rathole"] = dict(host="127.0.0.1", iperf=rh.iperf_port, echo_tcp=rh.echo_port,
                                echo_udp=rh.echo_port)
        for name, p in paths.items():
            wait_tcp(p["host"], p["echo_tcp"])

        res = {n: {"tcp": [], "udp": [], "udp_loss": [], "tcp_lat": [], "udp_lat": []}
               for n in paths}
        order = list(paths)
        for r in range(args.rounds):
            random.shuffle(order)
            for n in order:
                p = paths[n]
                bps, _ = iperf(p["host"], p["iperf"], args.secs, udp=False)
                res[n]["tcp"].append(bps)
            random.shuffle(order)
            for n in order:
                p = paths[n]
                bps, loss = iperf(p["host"], p["iperf"], args.secs, udp=True)
                res[n]["udp"].append(bps)
                res[n]["udp_loss"].append(loss)
            random.shuffle(order)
            for n in order:
                p = paths[n]
                res[n]["tcp_lat"] += tcp_latency(p["host"], p["echo_tcp"], args.pings)
                res[n]["udp_lat"] += udp_latency(p["host"], p["echo_udp"], args.pings)
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)

        # Memory with many connections held open.
        rss = {}
        base_up = rss_kb(up.procs[0].pid)
        socks = hold_connections(up.echo_tcp, args.conns)
        rss["gateway"] = (base_up, rss_kb(up.procs[0].pid))
        for s in socks:
            s.close()
        base_rh = rss_kb(rh.server.pid) + rss_kb(rh.client.pid)
        socks = hold_connections(rh.echo_port, args.conns)
        rss["rathole"] = (base_rh, rss_kb(rh.server.pid) + rss_kb(rh.client.pid))
        for s in socks:
            s.close()

        load = open("/proc/loadavg").read().split()[:3]
        med = {n: {k: statistics.median(v) for k, v in d.items() if k in ("tcp", "udp", "udp_loss")}
               for n, d in res.items()}
        print(f"rounds {args.rounds} x {args.secs} s iperf3, {args.pings} pings per round; "
              f"load average {' '.join(load)}")
        print(f"{'path':10s} {'TCP Gbit/s':>11s} {'UDP Gbit/s':>11s} {'UDP loss %':>11s} "
              f"{'TCP p50 us':>11s} {'TCP p99 us':>11s} {'UDP p50 us':>11s} {'UDP p99 us':>11s}")
        for n, d in res.items():
            print(f"{n:10s} {med[n]['tcp'] / 1e9:11.2f} {med[n]['udp'] / 1e9:11.2f} "
                  f"{med[n]['udp_loss']:11.1f} "
                  f"{pct(d['tcp_lat'], 50) * 1e6:11.0f} {pct(d['tcp_lat'], 99) * 1e6:11.0f} "
                  f"{pct(d['udp_lat'], 50) * 1e6:11.0f} {pct(d['udp_lat'], 99) * 1e6:11.0f}")
        for n in paths:
            if n in ("direct", "rathole"):
                continue
            print(f"{n}: TCP {med[n]['tcp'] / med['rathole']['tcp']:.2f} x rathole, "
                  f"{med[n]['tcp'] / med['direct']['tcp']:.2f} x direct; "
                  f"UDP {med[n]['udp'] / med['rathole']['udp']:.2f} x rathole, "
                  f"{med[n]['udp'] / med['direct']['udp']:.2f} x direct")
        print(f"rathole: TCP {med['rathole']['tcp'] / med['direct']['tcp']:.2f} x direct, "
              f"UDP {med['rathole']['udp'] / med['direct']['udp']:.2f} x direct")
        for n, (before, held) in rss.items():
            print(f"RSS {n}: {before / 1024:.1f} MiB before, {held / 1024:.1f} MiB with "
                  f"{args.conns} connections")
    finally:
        for s in reversed(started):
            s.stop()


if __name__ == "__main__":
    main()
