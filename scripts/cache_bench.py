#!/usr/bin/env python3
"""P2P cache benchmark: `damselfly cache` on two node daemons and a scheduler on loopback, beside
the figures the Anolis write-up of its dfcache extension published for the same operations on a
1 GiB file.

Topology: a scheduler on 127.0.0.1 (gRPC :18002, HTTP :18080), daemon A on 127.0.0.2 and daemon
B on 127.0.0.3 (each with its own data dir under --work). Nothing is shaped: loopback, one disk.

Measured (each figure a median; the spread is printed beside it):
  stat, local           one connection to A's admin socket, --stat-calls calls of
                        {"op":"stat","local":true} for an entry A imported; per call
  stat, via scheduler   the same on B (which does not hold it): B asks the scheduler
  stat, missing id      the same on B for an id nobody imported
  import 1 GiB          `damselfly cache import FILE` on A, wall time of the command, a fresh file
                        of random bytes each run (just written, so in the page cache)
  export N from a peer  `damselfly cache export -O OUT` on B of content only A holds (imported
                        fresh each run), wall time of the command: pieces from A, every piece
                        checked against its pinned digest, the whole against its sha256, the file
                        written beside OUT, synced and renamed
An export's time is also split as its JSON reports it: the daemon's part (pieces from the peer,
verified, written into the client's file as they arrive, synced) and the client's (the rename).
References in the same run: `openssl dgst -sha256` of the 1 GiB file (one hash pass with the
CPU's SHA extensions, the floor of an import, and of each of an export's two checks) and `cp` of
it plus `sync` (writing it once to disk, the floor of an export's write).

Run: python3 scripts/cache_bench.py [--size-mib 1024] [--repeat 3] [--stat-calls 2000] [--json out.json]
          [--daemon-arg=--cache-direct-io=false]
Needs target/release/damselfly (cargo build --release -p damselfly). Python stdlib only.
"""

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIB = 1 << 20
SCHED = "127.0.0.1"
NODES = {"A": "127.0.0.2", "B": "127.0.0.3"}
PORTS = {"api": 16501, "health": 16502, "metrics": 16503, "upload": 16504}
# The Anolis write-up's figures (milliseconds) for a 1 GiB file, and this project's goals.
PUBLISHED = {
    "stat, local": (0.07, 0.07),
    "stat, via scheduler": (0.6, 0.6),
    "stat, missing id": (1.0, 0.6),
    "import 1 GiB": (2542, 800),
    "export 4 MiB from a peer": (14, 5),
    "export 128 MiB from a peer": (170, 60),
    "export 1 GiB from a peer": (2150, 430),
}


def log(msg):
    print(f"[cache-bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Cluster:
    def __init__(self, binary, work, log_level, daemon_args=()):
        self.binary, self.work, self.procs = binary, work, []
        secret = os.path.join(work, "secret")
        token = os.path.join(work, "token")
        for path in (secret, token):
            with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
                f.write(os.urandom(32).hex())
        self.spawn("scheduler", [binary, "scheduler", "--listen", f"{SCHED}:18002", "--http-listen", f"{SCHED}:18080",
                                 "--secret-file", secret, "--preheat-token-file", token,
                                 "--data-dir", os.path.join(work, "scheduler"), "--log-level", log_level])
        wait_http(f"http://{SCHED}:18080/healthy")
        self.data = {}
        for name, ip in NODES.items():
            data = os.path.join(work, name)
            os.makedirs(data)
            self.data[name] = data
            self.spawn(name, [binary, "mirror", "--data-dir", data, "--secret-file", secret,
                              "--listen", f"{ip}:{PORTS['api']}", "--health-listen", f"{ip}:{PORTS['health']}",
                              "--metrics-listen", f"{ip}:{PORTS['metrics']}", "--upload-listen", f"{ip}:{PORTS['upload']}",
                              "--advertise-ip", ip, "--host-id", f"bench-{name}", "--scheduler", f"http://{SCHED}:18002",
                              "--cache-quota", "3GiB", "--log-level", log_level, *daemon_args])
        for ip in NODES.values():
            wait_http(f"http://{ip}:{PORTS['health']}/healthy")
        # Both announced, and their preheat streams (replicas, drops) open.
        time.sleep(2)

    def spawn(self, name, argv):
        lf = open(os.path.join(self.work, f"{name}.log"), "w")
        self.procs.append(subprocess.Popen(argv, stdout=lf, stderr=lf, start_new_session=True))

    def stop(self):
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()

    def cache(self, node, *args, check=True):
        argv = [self.binary, "cache", *args, "--data-dir", self.data[node], "--json"]
        t0 = time.perf_counter()
        r = subprocess.run(argv, capture_output=True, text=True, timeout=600)
        ms = (time.perf_counter() - t0) * 1000
        if check and r.returncode != 0:
            raise SystemExit(f"damselfly cache {' '.join(args)} on {node}: rc={r.returncode} {r.stderr.strip()}")
        return ms, r


def wait_http(url, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"{url} never answered")


def stat_calls(data_dir, ident, local, calls):
    """Milliseconds per stat call over one admin socket connection."""
    s = socket.socket(socket.AF_UNIX)
    s.connect(os.path.join(data_dir, "admin", "cache.sock"))
    f = s.makefile("rb")
    line = (json.dumps({"op": "stat", "id": ident, "local": local}) + "\n").encode()
    times, answers = [], set()
    for _ in range(calls):
        t0 = time.perf_counter_ns()
        s.sendall(line)
        reply = f.readline()
        times.append((time.perf_counter_ns() - t0) / 1e6)
        answers.add(next(iter(json.loads(reply))))
    s.close()
    return times, answers


def random_file(path, mib):
    with open(path, "wb") as f:
        for _ in range(mib):
            f.write(os.urandom(MIB))


def spread(xs):
    xs = sorted(xs)
    q = lambda p: xs[min(len(xs) - 1, int(p * len(xs)))]
    return {"median": statistics.median(xs), "p10": q(0.10), "p90": q(0.90), "min": xs[0], "max": xs[-1], "n": len(xs)}


def machine(work):
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    fs = subprocess.run(["df", "-T", work], capture_output=True, text=True).stdout.splitlines()[-1].split()[1]
    mem = next(int(l.split()[1]) // (1 << 20) for l in open("/proc/meminfo") if l.startswith("MemTotal"))
    return f"{cpu}, {os.cpu_count()} cores, {mem} GiB, Linux {platform.release()}, {fs} at {work}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=1024, help="the large file (import, and the largest export)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--stat-calls", type=int, default=2000)
    ap.add_argument("--work", default=None, help="working directory (default: a new one under /var/tmp)")
    ap.add_argument("--binary", default=os.path.join(REPO_ROOT, "target", "release", "damselfly"))
    ap.add_argument("--log-level", default="warn")
    ap.add_argument("--daemon-arg", action="append", default=[], metavar="ARG",
                    help="extra argument for both `damselfly mirror`s (repeatable, e.g. --daemon-arg=--cache-direct-io=false)")
    ap.add_argument("--json", help="write the results here too")
    args = ap.parse_args()
    if not os.access(args.binary, os.X_OK):
        raise SystemExit(f"{args.binary} missing: cargo build --release -p damselfly")
    work = args.work or tempfile.mkdtemp(prefix="damselfly-cache-bench-", dir="/var/tmp")
    os.makedirs(work, exist_ok=True)
    results = {"machine": machine(work), "size_mib": args.size_mib, "repeat": args.repeat}
    log(results["machine"])
    results["daemon_args"] = args.daemon_arg
    cluster = Cluster(args.binary, work, args.log_level, args.daemon_arg)
    rows = {}
    try:
        small = os.path.join(work, "small")
        random_file(small, 1)
        cluster.cache("A", "import", small, "--id", "stat-me")
        times, answers = stat_calls(cluster.data["A"], "stat-me", True, args.stat_calls)
        assert answers == {"stat"}, answers
        rows["stat, local"] = spread(times)
        times, answers = stat_calls(cluster.data["B"], "stat-me", False, args.stat_calls)
        assert answers == {"stat"}, answers
        rows["stat, via scheduler"] = spread(times)
        times, answers = stat_calls(cluster.data["B"], "nobody-imported-this", False, args.stat_calls)
        assert answers == {"error"}, answers
        rows["stat, missing id"] = spread(times)
        log("stat: " + ", ".join(f"{k} {v['median']:.3f} ms" for k, v in rows.items()))

        big = os.path.join(work, "big")
        sha, cp, imports = [], [], []
        for i in range(args.repeat):
            random_file(big, args.size_mib)
            subprocess.run(["sync"])
            t0 = time.perf_counter()
            subprocess.run(["openssl", "dgst", "-sha256", big], check=True, capture_output=True)
            sha.append((time.perf_counter() - t0) * 1000)
            t0 = time.perf_counter()
            subprocess.run(["cp", big, big + ".copy"], check=True)
            subprocess.run(["sync", big + ".copy"], check=True)
            cp.append((time.perf_counter() - t0) * 1000)
            os.unlink(big + ".copy")
            ms, r = cluster.cache("A", "import", big, "--id", f"import-{i}")
            imports.append(ms)
            log(f"import {args.size_mib} MiB run {i}: {ms:.0f} ms ({json.loads(r.stdout)['placement']}); openssl sha256 {sha[-1]:.0f} ms, cp+sync {cp[-1]:.0f} ms")
            cluster.cache("A", "delete", "--id", f"import-{i}", "--all")
            os.unlink(big)
        rows[f"import {label(args.size_mib)}"] = spread(imports)
        rows[f"reference: openssl sha256 {label(args.size_mib)}"] = spread(sha)
        rows[f"reference: cp + sync {label(args.size_mib)}"] = spread(cp)

        for mib in sorted({4, 128, args.size_mib}):
            exports, daemon, write = [], [], []
            for i in range(args.repeat):
                src = os.path.join(work, f"export-src-{mib}")
                random_file(src, mib)
                ident = f"export-{mib}-{i}"
                cluster.cache("A", "import", src, "--id", ident)
                out = os.path.join(work, "out")
                ms, r = cluster.cache("B", "export", "--id", ident, "-O", out)
                got = json.loads(r.stdout)
                assert got["from_peers"] is True, got
                # The split below describes this path: written by the daemon, renamed by the client.
                assert got["written_by"] == "written as peers delivered it", got
                if filecmp(src, out) is False:
                    raise SystemExit(f"export {ident}: the output differs from the input")
                exports.append(ms)
                daemon.append(got["daemon_ms"])
                write.append(got["write_ms"])
                log(f"export {mib} MiB run {i}: {ms:.0f} ms (daemon {got['daemon_ms']:.0f} ms, write {got['write_ms']:.0f} ms)")
                cluster.cache("A", "delete", "--id", ident, "--all")
                os.unlink(out)
                os.unlink(src)
            rows[f"export {label(mib)} from a peer"] = spread(exports)
            rows[f"… {label(mib)}: the daemon's part (peers, verify, write, fsync)"] = spread(daemon)
            rows[f"… {label(mib)}: the client's part (rename)"] = spread(write)
    finally:
        cluster.stop()
    results["rows"] = rows
    print_table(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


def label(mib):
    return f"{mib // 1024} GiB" if mib >= 1024 and mib % 1024 == 0 else f"{mib} MiB"


def filecmp(a, b):
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(MIB), fb.read(MIB)
            if x != y:
                return False
            if not x:
                return True


def print_table(rows):
    print("| operation | Anolis dfcache (published) | goal | damselfly (median) | p10–p90 |")
    print("|---|---|---|---|---|")
    for name, s in rows.items():
        published, goal = PUBLISHED.get(name, (None, None))
        fmt = (lambda v: f"{v:.3f} ms") if s["median"] < 10 else (lambda v: f"{v:.0f} ms")
        pub = f"{published} ms" if published is not None else "–"
        g = f"≤ {goal} ms" if goal is not None else "–"
        print(f"| {name} | {pub} | {g} | {fmt(s['median'])} | {fmt(s['p10'])}–{fmt(s['p90'])} |")


if __name__ == "__main__":
    main()
