#!/usr/bin/env python3
"""Network-namespace cluster benchmark: N peers pull one blob, straight from the origin vs through
Damselfly (scheduler + seed peer + one node daemon per peer).

Topology (all on 10.213.0.0/24, namespaces prefixed `dfb-`, torn down at exit and at start):

    dfb-sw      switch namespace, bridge br0; one veth per namespace below
    dfb-origin  10.213.0.1   docker-registry :5000 (its link's egress shaped to --origin-rate)
    dfb-sched   10.213.0.2   damselfly scheduler (gRPC :8002, HTTP :8080)
    dfb-seed    10.213.0.3   damselfly mirror --seed
    dfb-p1..pN  10.213.0.11+ one damselfly mirror each (API :65001, health :40901,
                             metrics :8000, upload :65002) and the pulling curl

Every link is shaped at both ends with `tc tbf` (--rate, default 100mbit; the origin's own end
uses --origin-rate), so a peer can receive and send --rate at most and the origin is a bottleneck.
No netem in this kernel: there is no added latency or loss.

Scenarios, each run --repeat times (interleaved), medians reported:
  direct     every peer pulls the blob from the origin at once (curl, body piped into sha256sum);
  damselfly  fresh scheduler, seed and N daemons (empty data dirs); every peer pulls through its
             local daemon at once; bodies are sha256-checked, /metrics are scraped afterwards.
The figure is the finish time of the last peer relative to the common start; "origin copies" is
the body bytes of blob GETs in the origin's access log during the scenario / blob size; the ideal
is blob size / --rate.

Run (root): sudo python3 scripts/cluster_bench.py --nodes 8 --size 256 [--json out.json]
Needs: ip, tc, curl, sha256sum, docker-registry; target/release/damselfly (cargo build --release
-p damselfly). Python stdlib only.
"""

import argparse
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREFIX = "dfb-"
NET = "10.213.0"
ORIGIN_IP, SCHED_IP, SEED_IP = f"{NET}.1", f"{NET}.2", f"{NET}.3"
REG_PORT, API, HEALTH, METRICS, UPLOAD = 5000, 65001, 40901, 8000, 65002
REPO = "bench/blob"
MIB = 1 << 20
GOAL_COPIES, GOAL_IDEAL_RATIO = 1.1, 1.5
ACCESS_RE = re.compile(r'"(?P<method>[A-Z]+) (?P<path>\S+) HTTP/[\d.]+" (?P<status>\d{3}) (?P<bytes>\d+|-)')


class BenchError(Exception):
    pass


def log(msg):
    print(f"[cluster {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def sh(*argv, check=True, timeout=30):
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise BenchError(f"{' '.join(argv)}: rc={r.returncode} {r.stderr.strip()}")
    return r


def nsx(ns, *argv):
    return ["ip", "netns", "exec", ns, *argv]


# ------------------------------------------------------------------------------------ processes

class Procs:
    """Every long-running child, stopped by PID (SIGTERM, then SIGKILL) at teardown."""

    def __init__(self):
        self.procs = []

    def spawn(self, argv, logfile=None, **kw):
        if logfile:
            with open(logfile, "ab") as f:
                f.write(("$ " + shlex.join(argv) + "\n").encode())
                f.flush()
                p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT,
                                     env={**os.environ, "NO_COLOR": "1"})
        else:
            p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, **kw)
        self.procs.append(p)
        return p

    def stop(self, procs, timeout=10):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for p in procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            if p in self.procs:
                self.procs.remove(p)

    def stop_all(self):
        self.stop(list(self.procs))


PROCS = Procs()


def cpu_seconds(pid):
    """utime + stime of a live pid (ip netns exec execs the command, so the Popen pid is it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


class CpuSampler:
    """Machine-wide busy fraction from /proc/stat: mean and peak over 1 s windows."""

    def __init__(self):
        self.samples, self.ev = [], threading.Event()
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    @staticmethod
    def _read():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        idle = v[3] + v[4]
        return sum(v) - idle, sum(v)

    def _run(self):
        prev = self._read()
        while not self.ev.wait(1.0):
            cur = self._read()
            dt = cur[1] - prev[1]
            if dt > 0:
                self.samples.append((cur[0] - prev[0]) / dt)
            prev = cur

    def stop(self):
        self.ev.set()
        self.t.join(timeout=3)
        s = self.samples or [float("nan")]
        return {"mean": statistics.mean(s), "peak": max(s), "windows_over_95pct": sum(x > 0.95 for x in s)}


# ------------------------------------------------------------------------------------ network

def list_ns():
    out = sh("ip", "netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(PREFIX)]


def teardown_network():
    """Kills whatever still runs in our namespaces (by PID), then deletes them."""
    for ns in list_ns():
        pids = sh("ip", "netns", "pids", ns, check=False).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
    time.sleep(0.2 if list_ns() else 0)
    for ns in list_ns():
        sh("ip", "netns", "del", ns, check=False)
    for line in sh("ip", "-o", "link", "show", check=False).stdout.splitlines():
        name = line.split(": ")[1].split("@")[0] if ": " in line else ""
        if re.fullmatch(r"df[vb]\d+", name):  # a veth left in the root namespace mid-setup
            sh("ip", "link", "del", name, check=False)


def shape(ns, dev, rate):
    sh(*nsx(ns, "tc", "qdisc", "replace", "dev", dev, "root", "tbf",
            "rate", rate, "burst", "64kb", "latency", "50ms"))


def add_host(sw, name, ip, idx, rate_host, rate_switch):
    """A namespace `name` with `ip`, its veth on the bridge, both ends shaped."""
    ns, inner, outer = PREFIX + name, f"dfv{idx}", f"dfb{idx}"
    sh("ip", "netns", "add", ns)
    sh("ip", "link", "add", inner, "type", "veth", "peer", "name", outer)
    sh("ip", "link", "set", inner, "netns", ns)
    sh("ip", "link", "set", outer, "netns", sw)
    sh("ip", "-n", sw, "link", "set", outer, "master", "br0")
    sh("ip", "-n", sw, "link", "set", outer, "up")
    sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", inner)
    sh("ip", "-n", ns, "link", "set", inner, "up")
    sh("ip", "-n", ns, "link", "set", "lo", "up")
    shape(ns, inner, rate_host)
    shape(sw, outer, rate_switch)
    return ns


def build_network(n, rate, origin_rate):
    sw = PREFIX + "sw"
    sh("ip", "netns", "add", sw)
    sh("ip", "-n", sw, "link", "add", "br0", "type", "bridge")
    sh("ip", "-n", sw, "link", "set", "br0", "up")
    sh("ip", "-n", sw, "link", "set", "lo", "up")
    hosts = {"origin": (add_host(sw, "origin", ORIGIN_IP, 0, origin_rate, rate), ORIGIN_IP),
             "sched": (add_host(sw, "sched", SCHED_IP, 1, rate, rate), SCHED_IP),
             "seed": (add_host(sw, "seed", SEED_IP, 2, rate, rate), SEED_IP)}
    for i in range(1, n + 1):
        ip = f"{NET}.{10 + i}"
        hosts[f"p{i}"] = (add_host(sw, f"p{i}", ip, 2 + i, rate, rate), ip)
    return hosts


def ns_curl(ns, url, timeout=5):
    """(http status or 0, body) of a GET made inside `ns`."""
    r = subprocess.run(nsx(ns, "curl", "-s", "-m", str(timeout), "-w", "\n%{http_code}", url),
                       capture_output=True, text=True, timeout=timeout + 10)
    body, _, code = r.stdout.rpartition("\n")
    return (int(code) if code.isdigit() else 0), body


def wait_healthy(ns, url, proc, what, logfile, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"{what} exited with {proc.returncode}; log: {logfile}\n{tail(logfile)}")
        if ns_curl(ns, url, 2)[0] == 200:
            return
        time.sleep(0.1)
    raise BenchError(f"{what} did not answer {url} in {timeout}s; log: {logfile}\n{tail(logfile)}")


def tail(path, lines=25):
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - 32768))
            return "\n".join(f.read().decode("utf-8", "replace").splitlines()[-lines:])
    except OSError:
        return ""


# ------------------------------------------------------------------------------------ origin

class Origin:
    def __init__(self, ns, work):
        self.ns, self.host = ns, f"{ORIGIN_IP}:{REG_PORT}"
        self.url = f"http://{self.host}"
        d = os.path.join(work, "origin")
        os.makedirs(os.path.join(d, "storage"))
        self.access_log, self.log = os.path.join(work, "logs", "origin-access.log"), os.path.join(work, "logs", "origin.log")
        conf = os.path.join(d, "registry.yml")
        with open(conf, "w") as f:
            f.write(f"version: 0.1\nlog: {{level: info}}\nstorage:\n  filesystem: {{rootdirectory: {d}/storage}}\n"
                    f"  delete: {{enabled: true}}\nhttp:\n  addr: {self.host}\n  secret: damselfly-cluster-bench\n")
        with open(self.access_log, "ab") as out, open(self.log, "ab") as err:
            self.proc = PROCS.spawn(nsx(ns, "docker-registry", "serve", conf), stdout=out, stderr=err)
        wait_healthy(ns, self.url + "/v2/", self.proc, "docker-registry", self.log)

    def push(self, path, hexd):
        """Monolithic upload (POST, then PUT ?digest=) from inside the origin namespace."""
        r = sh(*nsx(self.ns, "curl", "-sS", "-o", "/dev/null", "-D", "-", "-X", "POST",
                    f"{self.url}/v2/{REPO}/blobs/uploads/"))
        loc = next((l.split(":", 1)[1].strip() for l in r.stdout.splitlines() if l.lower().startswith("location:")), None)
        if not loc:
            raise BenchError(f"upload POST gave no Location: {r.stdout!r}")
        loc = self.url + loc if loc.startswith("/") else loc
        sep = "&" if "?" in loc else "?"
        r = sh(*nsx(self.ns, "curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "-X", "PUT", "-T", path,
                    "-H", "Content-Type: application/octet-stream", f"{loc}{sep}digest=sha256:{hexd}"), timeout=600)
        if r.stdout.strip() != "201":
            raise BenchError(f"upload PUT answered {r.stdout!r}\n{tail(self.log)}")

    def offset(self):
        return os.path.getsize(self.access_log)

    def blob_bytes_since(self, offset, settle=0.5, timeout=15):
        """Body bytes of blob GETs logged after `offset`, once the log has been quiet `settle` s
        (the registry logs a request when its response is complete)."""
        last, quiet_since, deadline = -1, time.monotonic(), time.monotonic() + timeout
        while time.monotonic() < deadline:
            size = self.offset()
            if size != last:
                last, quiet_since = size, time.monotonic()
            elif time.monotonic() - quiet_since >= settle:
                break
            time.sleep(0.05)
        total, gets = 0, 0
        with open(self.access_log, "rb") as f:
            f.seek(offset)
            for raw in f:
                m = ACCESS_RE.search(raw.decode("utf-8", "replace"))
                if m and m["method"] == "GET" and m["path"].startswith(f"/v2/{REPO}/blobs/"):
                    total += 0 if m["bytes"] == "-" else int(m["bytes"])
                    gets += 1
        return total, gets


# ------------------------------------------------------------------------------------ damselfly

def make_pki(directory, hosts):
    """A CA and, per host, a certificate naming its IP (openssl), for --tls. Returns the paths."""
    os.makedirs(directory, exist_ok=True)
    ca, ca_key = os.path.join(directory, "ca.pem"), os.path.join(directory, "ca.key")
    newkey = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    sh("openssl", "req", "-x509", *newkey, "-keyout", ca_key, "-out", ca, "-days", "2", "-subj", "/CN=bench-ca")
    out = {"ca": ca}
    for name, (_, ip) in hosts.items():
        key, csr, cert = (os.path.join(directory, f"{name}.{ext}") for ext in ("key", "csr", "pem"))
        ext = os.path.join(directory, f"{name}.ext")
        with open(ext, "w") as f:
            f.write(f"subjectAltName=IP:{ip}\n")
        sh("openssl", "req", *newkey, "-keyout", key, "-out", csr, "-subj", f"/CN={name}")
        sh("openssl", "x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-out", cert,
           "-days", "2", "-extfile", ext)
        out[name] = (cert, key)
    return out


class Cluster:
    """One fresh scheduler, seed and node daemons with empty data dirs."""

    def __init__(self, binary, hosts, n, work, run_id, args):
        self.binary, self.hosts, self.work, self.args = binary, hosts, work, args
        self.data = os.path.join(work, "data", run_id)
        self.logs = os.path.join(work, "logs")
        self.daemons = {}  # name -> (ns, ip, proc, logfile)
        ns, ip = hosts["sched"]
        lf = os.path.join(self.logs, f"{run_id}-scheduler.log")
        self.pki = make_pki(os.path.join(work, "pki", run_id), hosts) if args.tls else None
        # The cluster secret every member proves itself with, as a deployment has it.
        self.secret = os.path.join(work, "pki", f"{run_id}-secret")
        os.makedirs(os.path.dirname(self.secret), exist_ok=True)
        with open(os.open(self.secret, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            f.write(os.urandom(32).hex())
        argv = [binary, "scheduler", "--listen", f"{ip}:8002", "--http-listen", f"{ip}:8080",
                "--secret-file", self.secret, "--log-level", args.log_level] + args.scheduler_arg
        if self.pki:
            cert, key = self.pki["sched"]
            argv += ["--tls-cert", cert, "--tls-key", key, "--tls-client-ca", self.pki["ca"]]
        self.daemons["scheduler"] = (ns, ip, PROCS.spawn(nsx(ns, *argv), lf), lf)
        wait_healthy(ns, f"http://{ip}:8080/healthy", self.daemons["scheduler"][2], "scheduler", lf)
        for name in ["seed"] + [f"p{i}" for i in range(1, n + 1)]:
            self._start_mirror(name, run_id)
        for name, (ns, ip, proc, lf) in self.daemons.items():
            if name != "scheduler":
                wait_healthy(ns, f"http://{ip}:{HEALTH}/healthy", proc, name, lf)
        self.known_hosts = self._wait_hosts(n + 1)
        # The seed opens its seed-task stream up to ~1 s after its first announce; a pull that
        # comes earlier finds no seed and the first peer goes to the origin itself.
        time.sleep(args.settle)

    def _start_mirror(self, name, run_id):
        ns, ip = self.hosts[name]
        data = os.path.join(self.data, name)
        os.makedirs(data)
        lf = os.path.join(self.logs, f"{run_id}-{name}.log")
        argv = [self.binary, "mirror", "--listen", f"{ip}:{API}", "--health-listen", f"{ip}:{HEALTH}",
                "--metrics-listen", f"{ip}:{METRICS}", "--data-dir", data,
                "--registry-mirror", f"http://{ORIGIN_IP}:{REG_PORT}", "--insecure-registry", f"{ORIGIN_IP}:{REG_PORT}",
                "--scheduler", f"{'https' if self.pki else 'http'}://{SCHED_IP}:8002", "--upload-listen", f"{ip}:{UPLOAD}",
                "--advertise-ip", ip, "--host-id", f"{name}-{run_id}", "--secret-file", self.secret,
                "--log-level", self.args.log_level]
        if name == "seed":
            argv.append("--seed")
        if self.pki:
            cert, key = self.pki[name]
            argv += ["--cluster-ca", self.pki["ca"], "--cluster-cert", cert, "--cluster-key", key, "--peer-tls"]
        argv += self.args.daemon_arg
        self.daemons[name] = (ns, ip, PROCS.spawn(nsx(ns, *argv), lf), lf)

    def _wait_hosts(self, want, timeout=15):
        """Hosts the scheduler knows (damselfly_scheduler_hosts), waiting up to `timeout` s for `want`."""
        ns, ip = self.hosts["sched"]
        deadline, seen = time.monotonic() + timeout, None
        while time.monotonic() < deadline:
            m = parse_metrics(ns_curl(ns, f"http://{ip}:8080/metrics")[1])
            seen = sum(v for k, v in m.items() if k.startswith("damselfly_scheduler_hosts"))
            if seen >= want:
                return seen
            time.sleep(0.2)
        log(f"warning: the scheduler knows {seen} hosts, expected {want}")
        return seen

    def blob_url(self, name, hexd):
        return f"http://{self.hosts[name][1]}:{API}/v2/{REPO}/blobs/sha256:{hexd}?ns={ORIGIN_IP}:{REG_PORT}"

    def metrics(self, name, port=METRICS):
        ns, ip = self.hosts[name]
        return parse_metrics(ns_curl(ns, f"http://{ip}:{port}/metrics")[1])

    def node_stats(self):
        out = {}
        for name, (ns, ip, proc, lf) in self.daemons.items():
            if name == "scheduler":
                m = self.metrics("sched", 8080)
                out[name] = {k: v for k, v in m.items() if k.startswith("damselfly_scheduler_decisions")}
            else:
                m = self.metrics(name)
                out[name] = {"download": by_source(m, "damselfly_download_bytes_total"),
                             "fetched": by_source(m, "damselfly_fetched_bytes_total"),
                             "upload": sum(v for k, v in m.items() if k.startswith("damselfly_upload_bytes_total"))}
            out[name]["cpu_s"] = round(cpu_seconds(proc.pid), 2)
            out[name]["alive"] = proc.poll() is None
        return out

    def stop(self):
        PROCS.stop([d[2] for d in self.daemons.values()])
        shutil.rmtree(self.data, ignore_errors=True)


def parse_metrics(text):
    """{series: value} of a Prometheus text exposition (timestamps ignored)."""
    out = {}
    for m in re.finditer(r"^([a-zA-Z_:][\w:]*(?:\{[^}]*\})?)\s+([-+\w.]+)", text, re.M):
        try:
            out[m[1]] = out.get(m[1], 0.0) + float(m[2])
        except ValueError:
            pass
    return out


def by_source(m, name):
    out = {}
    for k, v in m.items():
        if k.startswith(name + "{"):
            s = re.search(r'source="([^"]*)"', k)
            out[s[1] if s else "?"] = out.get(s[1] if s else "?", 0.0) + v
    return out


# ------------------------------------------------------------------------------------ pulls

class Pull:
    """`curl URL` inside a namespace, its body piped into sha256sum; finish time recorded."""

    def __init__(self, ns, url, t0, max_time):
        self.ns, self.url, self.t0 = ns, url, t0
        self.curl = subprocess.Popen(nsx(ns, "curl", "-sS", "-m", str(int(max_time)), "-o", "-", "-w",
                                         "%{stderr}\nRESULT %{http_code} %{size_download} %{time_total}\n", url),
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.hash = subprocess.Popen(["sha256sum"], stdin=self.curl.stdout, stdout=subprocess.PIPE)
        self.curl.stdout.close()
        self.err = b""
        self.t = threading.Thread(target=self._wait, daemon=True)
        self.t.start()

    def _wait(self):
        self.err = self.curl.stderr.read()
        self.curl.wait()
        self.hex = self.hash.communicate()[0].decode().split(" ")[0]
        self.finish = time.monotonic() - self.t0

    def result(self, timeout):
        self.t.join(timeout)
        if self.t.is_alive():
            self.curl.kill()
            self.t.join(10)
            raise BenchError(f"pull in {self.ns} of {self.url} did not finish in {timeout:.0f}s")
        err = self.err.decode("utf-8", "replace")
        m = re.search(r"RESULT (\d+) (\d+) ([\d.]+)", err)
        code, size = (int(m[1]), int(m[2])) if m else (0, 0)
        return {"ns": self.ns, "rc": self.curl.returncode, "http": code, "bytes": size, "sha256": self.hex,
                "finish_s": round(self.finish, 3), "curl_err": err.replace("\n", " ").strip()[:300]}


def pull_all(targets, hexd, size, max_time):
    """targets = [(ns, url)]; all started at once. Returns per-peer results; fails on a bad body."""
    t0 = time.monotonic()
    pulls = [Pull(ns, url, t0, max_time) for ns, url in targets]
    res = [p.result(max_time + 60) for p in pulls]
    bad = [r for r in res if r["rc"] != 0 or r["http"] != 200 or r["bytes"] != size or r["sha256"] != hexd]
    return res, bad


def summarize(res, size, ideal):
    t = [r["finish_s"] for r in res]
    return {"last_s": max(t), "median_s": statistics.median(t), "ratio_to_ideal": max(t) / ideal, "per_peer_s": t}


def top_snapshot():
    """The second iteration of `top` (the first one's CPU figures are since boot)."""
    out = sh("top", "-bn2", "-d0.5", "-w", "200", check=False).stdout
    return "\n".join(out[out.rfind("top - "):].splitlines()[:16])


def run_direct(hosts, origin, n, hexd, size, ideal, max_time):
    off = origin.offset()
    cpu = CpuSampler()
    res, bad = pull_all([(hosts[f"p{i}"][0], f"{origin.url}/v2/{REPO}/blobs/sha256:{hexd}") for i in range(1, n + 1)],
                        hexd, size, max_time)
    cpu = cpu.stop()
    if bad:
        raise BenchError(f"direct pulls failed: {bad}")
    copied, gets = origin.blob_bytes_since(off)
    return {**summarize(res, size, ideal), "origin_copies": copied / size, "origin_blob_gets": gets, "cpu": cpu}


def run_damselfly(binary, hosts, origin, n, hexd, size, ideal, max_time, work, run_id, args):
    cluster = Cluster(binary, hosts, n, work, run_id, args)
    try:
        off = origin.offset()
        cpu = CpuSampler()
        snap = {}
        timer = threading.Timer(max(1.0, ideal * 0.5), lambda: snap.setdefault("top", top_snapshot()))
        timer.start()
        res, bad = pull_all([(hosts[f"p{i}"][0], cluster.blob_url(f"p{i}", hexd)) for i in range(1, n + 1)],
                            hexd, size, max_time)
        timer.cancel()
        cpu = cpu.stop()
        copied, gets = origin.blob_bytes_since(off)
        stats = cluster.node_stats()
        out = {**summarize(res, size, ideal), "origin_copies": copied / size, "origin_blob_gets": gets,
               "cpu": cpu, "top_mid_run": snap.get("top", ""), "nodes": stats,
               "scheduler_hosts_seen": cluster.known_hosts, "failed_pulls": bad, "peers": res}
        peers = [v for k, v in stats.items() if k.startswith("p")]
        out["peer_fetched_from_peer_mib"] = sum(p["fetched"].get("peer", 0) for p in peers) / MIB
        out["peer_fetched_from_origin_mib"] = sum(p["fetched"].get("origin", 0) for p in peers) / MIB
        out["seed_fetched_from_origin_mib"] = stats["seed"]["fetched"].get("origin", 0) / MIB
        out["uploaded_mib"] = sum(v.get("upload", 0) for k, v in stats.items() if k != "scheduler") / MIB
        out["seed_upload_copies"] = stats["seed"]["upload"] / size
        return out
    finally:
        cluster.stop()


# ------------------------------------------------------------------------------------ report

def rate_bits(rate):
    m = re.fullmatch(r"([\d.]+)\s*([kmgt]?)(bit|bps)", rate.strip().lower())
    if not m:
        raise BenchError(f"cannot parse rate {rate!r} (use e.g. 100mbit)")
    mult = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}[m[2]]
    return float(m[1]) * mult * (8 if m[3] == "bps" else 1)


def med(runs, key):
    return statistics.median(r[key] for r in runs)


def report(args, ideal, results):
    w = []
    w.append(f"## Cluster benchmark: {args.nodes} peers, {args.size} MiB blob, links {args.rate}, "
             f"origin {args.origin_rate}, median of {args.repeat} run(s)"
             f"{', mutual TLS (scheduler and pieces)' if args.tls else ''}\n")
    w.append(f"Ideal (blob / link rate) = {ideal:.1f} s\n")
    w.append("| scenario | last peer s | × ideal | median peer s | max peer s | origin copies | CPU mean / peak |")
    w.append("|---|---:|---:|---:|---:|---:|---:|")
    for name, runs in results.items():
        if runs:
            w.append(f"| {name} | {med(runs, 'last_s'):.1f} | {med(runs, 'ratio_to_ideal'):.2f} | "
                     f"{med(runs, 'median_s'):.1f} | {max(r['last_s'] for r in runs):.1f} | "
                     f"{med(runs, 'origin_copies'):.2f} | {statistics.median(r['cpu']['mean'] for r in runs):.0%} / "
                     f"{max(r['cpu']['peak'] for r in runs):.0%} |")
    d = results.get("damselfly") or []
    if d:
        c, r = med(d, "origin_copies"), med(d, "ratio_to_ideal")
        w.append("")
        w.append(f"- damselfly origin copies {c:.2f} (goal ≤ {GOAL_COPIES}): {'ok' if c <= GOAL_COPIES else '**MISSED**'}")
        w.append(f"- damselfly last peer {r:.2f} × ideal (goal ≤ {GOAL_IDEAL_RATIO}): "
                 f"{'ok' if r <= GOAL_IDEAL_RATIO else '**MISSED**'}")
        last = d[-1]
        w.append(f"- bytes fetched by the peers (last run): from peers {last['peer_fetched_from_peer_mib']:.0f} MiB, "
                 f"from origin {last['peer_fetched_from_origin_mib']:.0f} MiB; seed from origin "
                 f"{last['seed_fetched_from_origin_mib']:.0f} MiB; uploaded {last['uploaded_mib']:.0f} MiB, of which "
                 f"the seed {last['seed_upload_copies']:.2f} copies")
        w.append("- per-peer finish s (last run): " + " ".join(f"{t:.1f}" for t in last["per_peer_s"]))
        cpu = [r["nodes"] for r in d]
        peers = statistics.median(sum(v["cpu_s"] for k, v in n.items() if k.startswith("p")) for n in cpu)
        seed = statistics.median(n["seed"]["cpu_s"] for n in cpu)
        w.append(f"- daemon CPU seconds (median over runs): all peers {peers:.1f}, seed {seed:.1f}")
    a = results.get("direct") or []
    if a:
        w.append("- direct per-peer finish s (last run): " + " ".join(f"{t:.1f}" for t in a[-1]["per_peer_s"]))
    print("\n".join(w))


# ------------------------------------------------------------------------------------ main

def write_blob(path, size):
    h = hashlib.sha256()
    with open(path, "wb") as f:
        for off in range(0, size, 8 * MIB):
            b = os.urandom(min(8 * MIB, size - off))
            h.update(b)
            f.write(b)
    return h.hexdigest()


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--nodes", type=int, default=8, help="peer namespaces (default 8; at most 200)")
    ap.add_argument("--size", type=int, default=256, help="blob size in MiB (default 256)")
    ap.add_argument("--rate", default="100mbit", help="tbf rate of every link, both ends (default 100mbit)")
    ap.add_argument("--origin-rate", default=None, help="egress rate of the origin's link (default --rate)")
    ap.add_argument("--repeat", type=int, default=1, help="runs per scenario; medians reported (default 1)")
    ap.add_argument("--scenarios", default="direct,damselfly", help="subset of direct,damselfly")
    ap.add_argument("--json", metavar="PATH", help="write the results as JSON")
    ap.add_argument("--keep-logs", metavar="DIR", help="copy all logs (daemons, origin) to DIR")
    ap.add_argument("--binary", default=os.path.join(REPO_ROOT, "target", "release", "damselfly"))
    ap.add_argument("--settle", type=float, default=3.0,
                    help="seconds between all daemons healthy and the pulls (default 3)")
    ap.add_argument("--log-level", default="info", help="--log-level of every daemon (default info)")
    ap.add_argument("--scheduler-arg", action="append", default=[], metavar="ARG",
                    help="extra argument for `damselfly scheduler` (repeatable, e.g. --scheduler-arg=--max-parents=8)")
    ap.add_argument("--tls", action="store_true",
                    help="scheduler over mutual TLS and pieces with --peer-tls (certificates made with openssl)")
    ap.add_argument("--daemon-arg", action="append", default=[], metavar="ARG",
                    help="extra argument for every `damselfly mirror` (repeatable, e.g. --daemon-arg=--max-uploads=8)")
    args = ap.parse_args()
    args.origin_rate = args.origin_rate or args.rate
    if not 1 <= args.nodes <= 200 or args.size < 1 or args.repeat < 1:
        ap.error("--nodes must be 1..200, --size and --repeat >= 1")
    args.scenarios = [s for s in args.scenarios.split(",") if s]
    if not set(args.scenarios) <= {"direct", "damselfly"}:
        ap.error("--scenarios: choose from direct,damselfly")
    return args


def preflight(args):
    if os.geteuid() != 0:
        raise BenchError("run as root (network namespaces): sudo python3 scripts/cluster_bench.py")
    for tool in ("ip", "tc", "curl", "sha256sum", "docker-registry", "top"):
        if not shutil.which(tool):
            raise BenchError(f"`{tool}` not found (docker-registry: apt-get install docker-registry; "
                             "ip/tc: iproute2; or run scripts/install-test-deps.sh)")
    if "damselfly" in args.scenarios and not os.access(args.binary, os.X_OK):
        raise BenchError(f"{args.binary} missing: cargo build --release -p damselfly")


def main():
    args = parse_args()
    preflight(args)
    size, bits = args.size * MIB, rate_bits(args.rate)
    ideal = size * 8 / bits
    # Bound for one pull: the direct scenario shares the origin link N ways, then 3× slack.
    max_time = 120 + 3 * args.nodes * size * 8 / min(bits, rate_bits(args.origin_rate))
    work = tempfile.mkdtemp(prefix="damselfly-cluster-")
    os.makedirs(os.path.join(work, "logs"))
    need = size * (args.nodes + 4)
    if shutil.disk_usage(work).free < need:
        raise BenchError(f"need {need / MIB:.0f} MiB free in {work}")
    ok = False
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with SIGINT ignored
    try:
        if list_ns():
            log(f"removing leftovers of an earlier run: {' '.join(list_ns())}")
        teardown_network()
        binary = os.path.join(work, "damselfly")
        if "damselfly" in args.scenarios:  # private copy: a concurrent cargo build cannot swap it
            shutil.copy2(args.binary, binary)
        log(f"work dir {work}; building {args.nodes}-peer network")
        hosts = build_network(args.nodes, args.rate, args.origin_rate)
        origin = Origin(hosts["origin"][0], work)
        blob = os.path.join(work, "blob.bin")
        hexd = write_blob(blob, size)
        origin.push(blob, hexd)
        os.remove(blob)
        log(f"pushed sha256:{hexd[:16]}… ({args.size} MiB); ideal {ideal:.1f} s")
        results = {s: [] for s in args.scenarios}
        for k in range(args.repeat):
            for s in args.scenarios:
                log(f"run {k + 1}/{args.repeat}: {s}")
                if s == "direct":
                    r = run_direct(hosts, origin, args.nodes, hexd, size, ideal, max_time)
                else:
                    r = run_damselfly(binary, hosts, origin, args.nodes, hexd, size, ideal, max_time,
                                      work, f"r{k + 1}", args)
                log(f"  last peer {r['last_s']:.1f} s ({r['ratio_to_ideal']:.2f}× ideal), "
                    f"origin copies {r['origin_copies']:.2f}, CPU mean {r['cpu']['mean']:.0%}")
                results[s].append(r)
                if r.get("failed_pulls"):
                    raise BenchError(f"damselfly pulls failed (logs in {work}/logs): "
                                     + json.dumps(r["failed_pulls"], indent=1))
        report(args, ideal, results)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"args": vars(args), "digest": "sha256:" + hexd, "ideal_s": ideal,
                           "nproc": os.cpu_count(), "results": results}, f, indent=1)
            log(f"wrote {args.json}")
        ok = True
        return 0
    finally:
        PROCS.stop_all()
        teardown_network()
        if args.keep_logs:
            shutil.copytree(os.path.join(work, "logs"), args.keep_logs, dirs_exist_ok=True)
        if ok:
            shutil.rmtree(work, ignore_errors=True)
        else:
            for d in ("data", "origin"):
                shutil.rmtree(os.path.join(work, d), ignore_errors=True)
            log(f"FAILED; logs kept in {work}/logs")


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as e:
        print(f"cluster_bench: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
