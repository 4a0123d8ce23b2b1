#!/usr/bin/env python3
"""Cluster images: bundle size and save/load time against `docker save` / `docker load`.

The application: three images sharing a Debian base. The base is made once with
`debootstrap --variant=minbase bookworm DIR` piped through `tar` into `docker import`
(kisara-bench/debian), and three small `docker build`s FROM it add a file each
(kisara-bench/app1..3). A Kisarafile carries the three (IMAGE lines); `kisara build` makes
the bundle.

Measured in one run, RUNS interleaved rounds, medians:
  size   `kisara save --zstd` file   vs the three separate `docker save` tars, summed
         (plus the plain, uncompressed bundle for reference)
  save   `kisara save NAME --zstd`    vs `docker save app1 app2 app3 -o FILE`
  load   `kisara load -i FILE` into a fresh data dir, then `kisara bundle images --all` into the
         engine through a running `kisara up` (the app images removed first)
         vs `docker load -i FILE` (the same images removed first)

Usage: bench/bundle.py [RUNS]     (default 5; root, Docker, debootstrap; target/release/kisara or $KISARA_BIN)
"""
import os, shutil, statistics, subprocess, sys, tempfile, time

from common import KISARA, free_port, kisara_up, positional, stop_kisara, wait_ready

RUNS = positional(__doc__, ("RUNS", 5, "interleaved rounds")).runs
BASE = "kisara-bench/debian:bookworm"
APPS = [f"kisara-bench/app{i}:v1" for i in (1, 2, 3)]


def sh(*args, **kw):
    return subprocess.run(list(args), check=True, **kw)


def out(*args):
    return subprocess.run(list(args), check=True, capture_output=True, text=True).stdout


def have_image(ref):
    return subprocess.run(["docker", "image", "inspect", ref], capture_output=True).returncode == 0


def make_images(work):
    if not have_image(BASE):
        root = os.path.join(work, "rootfs")
        print("debootstrap --variant=minbase bookworm (once)", file=sys.stderr)
        sh("debootstrap", "--variant=minbase", "bookworm", root, stdout=subprocess.DEVNULL)
        tar = subprocess.Popen(["tar", "-C", root, "-c", "."], stdout=subprocess.PIPE)
        sh("docker", "import", "-", BASE, stdin=tar.stdout, stdout=subprocess.DEVNULL)
        tar.wait()
        shutil.rmtree(root, ignore_errors=True)
    for i, ref in enumerate(APPS, 1):
        ctx = os.path.join(work, f"app{i}")
        os.makedirs(ctx, exist_ok=True)
        with open(os.path.join(ctx, "payload.bin"), "wb") as f:
            f.write(os.urandom(256 * 1024))
        with open(os.path.join(ctx, "Dockerfile"), "w") as f:
            f.write(f"FROM {BASE}\nCOPY payload.bin /opt/app{i}/payload.bin\n")
        sh("docker", "build", "-q", "-t", ref, ctx, stdout=subprocess.DEVNULL)


def timed(fn):
    t = time.monotonic()
    fn()
    return time.monotonic() - t


def rmi_apps():
    subprocess.run(["docker", "rmi", *APPS], capture_output=True)


def main():
    if not os.path.exists(KISARA):
        sys.exit("build first: cargo build --release -p kisara")
    work = tempfile.mkdtemp(prefix="kisara-bench-")
    proc = url = token = None
    try:
        make_images(work)
        data = os.path.join(work, "data")
        ctx = os.path.join(work, "bundle")
        os.makedirs(ctx)
        with open(os.path.join(ctx, "Kisarafile"), "w") as f:
            f.write("FROM scratch\n" + "".join(f"IMAGE {r}\n" for r in APPS))
        sh(KISARA, "--data-dir", data, "build", "-t", "bench:1", ctx, stdout=subprocess.DEVNULL)

        # Sizes.
        sizes = []
        for r in APPS:
            p = os.path.join(work, r.split("/")[1].replace(":", "_") + ".tar")
            sh("docker", "save", r, "-o", p)
            sizes.append(os.path.getsize(p))
            os.remove(p)
        plain = os.path.join(work, "bench.tar")
        sh(KISARA, "--data-dir", data, "save", "bench:1", "-o", plain, stdout=subprocess.DEVNULL)
        zst = os.path.join(work, "bench.tar.zst")
        sh(KISARA, "--data-dir", data, "save", "bench:1", "-o", zst, "--zstd", stdout=subprocess.DEVNULL)
        separate = sum(sizes)

        # A kisara up whose data dir is the "site" that loads the bundle.
        site = os.path.join(work, "site")
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc = kisara_up(site, port, stderr=subprocess.DEVNULL)
        token = wait_ready(url, site, proc, "kisara up", deadline=30)

        docker_tar = os.path.join(work, "all.tar")
        t = {"kisara-save": [], "docker-save": [], "kisara-load": [], "docker-load": [],
             "load-step": [], "images-step": []}
        for i in range(RUNS):
            t["kisara-save"].append(timed(lambda: sh(
                KISARA, "--data-dir", data, "save", "bench:1", "-o", zst, "--zstd", stdout=subprocess.DEVNULL)))
            t["docker-save"].append(timed(lambda: sh("docker", "save", *APPS, "-o", docker_tar)))
            rmi_apps()
            def kisara_load():
                shutil.rmtree(os.path.join(site, "bundles"), ignore_errors=True)
                t["load-step"].append(timed(lambda: sh(
                    KISARA, "--data-dir", site, "load", "-i", zst, stdout=subprocess.DEVNULL)))
                t["images-step"].append(timed(lambda: sh(
                    KISARA, "--data-dir", site, "--url", url, "bundle", "images", "bench:1", "--all",
                    stdout=subprocess.DEVNULL)))
            t["kisara-load"].append(timed(kisara_load))
            assert all(have_image(r) for r in APPS), "kisara did not load the images"
            rmi_apps()
            t["docker-load"].append(timed(lambda: sh("docker", "load", "-i", docker_tar, stdout=subprocess.DEVNULL)))
            assert all(have_image(r) for r in APPS)
        med = {k: statistics.median(v) for k, v in t.items()}
        mib = lambda n: n / (1 << 20)
        print(f"images: {', '.join(APPS)} (base {BASE}); {RUNS} interleaved rounds, medians")
        print(f"size   three docker save tars {mib(separate):8.1f} MiB")
        print(f"       bundle, plain          {mib(os.path.getsize(plain)):8.1f} MiB  ratio {os.path.getsize(plain) / separate:.2f}")
        print(f"       bundle, zstd           {mib(os.path.getsize(zst)):8.1f} MiB  ratio {os.path.getsize(zst) / separate:.2f}")
        print(f"save   kisara save --zstd {med['kisara-save']:6.2f} s   docker save {med['docker-save']:6.2f} s   ratio {med['kisara-save'] / med['docker-save']:.2f}")
        print(f"load   kisara load + bundle images {med['kisara-load']:6.2f} s   docker load {med['docker-load']:6.2f} s   ratio {med['kisara-load'] / med['docker-load']:.2f}")
        print(f"       of which kisara load {med['load-step']:6.2f} s, bundle images {med['images-step']:6.2f} s")
        print(f"load average {os.getloadavg()[0]:.2f}")
    finally:
        if proc:
            stop_kisara(proc, url, token, timeout=15)
        rmi_apps()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
