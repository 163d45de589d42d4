#!/usr/bin/env python3
"""Blob-serving benchmark of the damselfly mirror against nginx and docker-registry.

Everything runs on loopback in one temp dir, side by side, with the runs of the compared
systems interleaved so that machine noise spreads evenly over them:

  1. setup      a random N MiB blob is pushed to an origin `docker-registry` (monolithic upload);
  2. cached     GET throughput: damselfly (warm cache) vs nginx sendfile on / off vs the registry;
  3. cold       one cold GET through a fresh damselfly vs a verifying fetch from the origin (the
                least work a verifying mirror must do), twice: with a client that only receives
                (the daemon verifies; the goal's measure) and with one that hashes too; as a
                reference, through a fresh docker-registry pull-through cache. The order rotates
                per run and every timed fetch follows `sync` and a 1 s pause;
  4. concurrent --clients cold GETs at once through a fresh damselfly: wall time, origin copies
                (from the origin's access log), peak RssAnon of the daemon, download metrics;
  5. reference  the same concurrent cold GETs through a fresh docker-registry pull-through cache.

Every body fetched in phases 3-5 is hashed while streaming (`curl | openssl dgst -sha256`) and
checked against the digest, except the cold GET whose client only receives: the blob the daemon
kept is hashed after it, untimed. Prints a markdown table (medians over --runs) and exits 0; exits
non-zero only on a wrong hash of a damselfly/origin/nginx body or a broken setup. Goals that are
missed are marked "GOAL MISSED", they do not fail the run.

`--phases` picks a subset of cached, cold and concurrent (the latter includes 5.); setup always runs.

Needs: python3 (stdlib), curl, openssl, nginx (`nginx-light`, /usr/sbin/nginx), docker-registry.
Usage: scripts/bench.py [--size-mib 1024] [--runs 5] [--clients 16] [--binary PATH] [--json OUT]
                        [--skip-proxy-reference] [--keep-temp] [--tmp-parent DIR]
                        [--phases cached,cold,concurrent]
"""

import argparse
import atexit
import hashlib
import json
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO = "bench/blob"
MIB = 1 << 20
NGINX = "/usr/sbin/nginx"
PHASES = ("cached", "cold", "concurrent")  # setup always runs
SETTLE_S = 1.0  # pause (after os.sync()) before each timed cold fetch

# Goals (see the README's performance section).
GOAL_CACHED_VS_NGINX = 0.90  # damselfly cached >= 0.9 * max(nginx sendfile on, off)
GOAL_COLD_RATIO = 1.10  # cold GET through damselfly <= 1.10 * direct verifying fetch
GOAL_TTFB_EXTRA_MS = 5.0  # cold TTFB <= direct TTFB + 5 ms
GOAL_RSS_MIB = 100.0  # peak RssAnon during the concurrent cold phase
GOAL_COPIES = 1.05  # origin copies for the concurrent cold phase


class BenchError(Exception):
    """A broken setup or a wrong hash: the run is worthless, exit non-zero."""


def log(msg):
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# Child processes: every child is tracked and killed at exit (finally + atexit).

class Children:
    def __init__(self):
        self.procs = []
        self.lock = threading.Lock()

    def spawn(self, argv, **kw):
        kw.setdefault("stdin", subprocess.DEVNULL)
        p = subprocess.Popen(argv, **kw)
        with self.lock:
            self.procs.append(p)
        return p

    def forget(self, p):
        with self.lock:
            if p in self.procs:
                self.procs.remove(p)

    def stop(self, p, timeout=10.0):
        """SIGTERM, then SIGKILL after `timeout`; always reaps."""
        if p.poll() is None:
            try:
                p.send_signal(signal.SIGTERM)
                p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)
            except ProcessLookupError:
                pass
        self.forget(p)

    def kill_all(self):
        with self.lock:
            procs = list(self.procs)
            self.procs.clear()
        for p in procs:
            if p.poll() is None:
                try:
                    p.kill()
                except ProcessLookupError:
                    pass
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass


CHILDREN = Children()


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_status(url, timeout=2.0):
    """Status code of a GET, or None if nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            r.read()
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except (urllib.error.URLError, OSError):
        return None


def wait_http(url, proc, what, logfile=None, timeout=30.0, ok=(200,)):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise BenchError(f"{what} exited with {proc.returncode} before answering {url}"
                             + tail_text(logfile))
        if http_status(url) in ok:
            return
        time.sleep(0.05)
    raise BenchError(f"{what} did not answer {url} within {timeout:.0f}s" + tail_text(logfile))


def tail_text(path, lines=30):
    if not path or not os.path.exists(path):
        return ""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - 64 * 1024))
        text = f.read().decode("utf-8", "replace").splitlines()[-lines:]
    return f"\n--- tail of {path} ---\n" + "\n".join(text) + "\n---"


def run(argv, timeout, **kw):
    """A short helper command (bounded)."""
    return subprocess.run(argv, timeout=timeout, capture_output=True, text=True, **kw)


# ----------------------------------------------------------------------------------------------
# docker-registry (origin and pull-through reference) and its access log.

# `127.0.0.1 - - [22/Nov/2026:21:27:22 +0000] "GET /v2/bench/blob/blobs/sha256:… HTTP/1.1" 200 67108864 "" "curl/7.88.1"`
ACCESS_RE = re.compile(r'"(?P<method>[A-Z]+) (?P<path>\S+) HTTP/[\d.]+" (?P<status>\d{3}) (?P<bytes>\d+|-)'
                       r'(?: "[^"]*" "(?P<agent>[^"]*)")?')


class Registry:
    """`docker-registry serve` with an explicit config. Its stdout (the Apache-style access log)
    and stderr (logrus) go to separate append-mode files."""

    def __init__(self, work, name, proxy_remote=None):
        self.name = name
        self.dir = os.path.join(work, name)
        os.makedirs(self.dir, exist_ok=True)
        self.storage = os.path.join(self.dir, "storage")
        os.makedirs(self.storage, exist_ok=True)
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.url = f"http://{self.host}"
        self.access_log = os.path.join(self.dir, "access.log")
        self.log = os.path.join(self.dir, "registry.log")
        conf = [
            "version: 0.1",
            "log: {level: warn}",
            "storage:",
            f"  filesystem: {{rootdirectory: {self.storage}}}",
            "  delete: {enabled: true}",
            "http:",
            f"  addr: {self.host}",
            # Silences the "No HTTP secret provided" warning; any fixed string will do.
            "  secret: damselfly-bench",
        ]
        if proxy_remote:
            conf += ["proxy:", f"  remoteurl: {proxy_remote}"]
        self.conf = os.path.join(self.dir, "registry.yml")
        with open(self.conf, "w") as f:
            f.write("\n".join(conf) + "\n")
        out = open(self.access_log, "ab")
        err = open(self.log, "ab")
        try:
            self.proc = CHILDREN.spawn(["docker-registry", "serve", self.conf], stdout=out, stderr=err)
        finally:
            out.close()
            err.close()
        wait_http(self.url + "/v2/", self.proc, f"docker-registry {name}", self.log)

    def stop(self):
        CHILDREN.stop(self.proc)

    def log_offset(self):
        return os.path.getsize(self.access_log)

    def requests_since(self, offset, path_prefix, method="GET", exclude_agent="curl/"):
        """[(status, bytes)] of `method` lines for paths starting with path_prefix after offset.
        The benchmark's own direct curl fetches of the origin (user agent curl/…) are left out:
        what remains is what the mirror or the pull-through cache asked for."""
        out = []
        with open(self.access_log, "rb") as f:
            f.seek(offset)
            for raw in f:
                m = ACCESS_RE.search(raw.decode("utf-8", "replace"))
                if (m and m["method"] == method and m["path"].startswith(path_prefix)
                        and not (exclude_agent and (m["agent"] or "").startswith(exclude_agent))):
                    out.append((int(m["status"]), 0 if m["bytes"] == "-" else int(m["bytes"])))
        return out

    def settled_bytes_since(self, offset, path_prefix, settle=0.5, timeout=15.0):
        """Waits until the access log stops growing for `settle` s (lines are written when a
        response completes), then sums the GET body bytes."""
        deadline = time.monotonic() + timeout
        last = -1
        stable_since = time.monotonic()
        while time.monotonic() < deadline:
            size = self.log_offset()
            if size != last:
                last, stable_since = size, time.monotonic()
            elif time.monotonic() - stable_since >= settle:
                break
            time.sleep(0.05)
        lines = self.requests_since(offset, path_prefix)
        return sum(b for _, b in lines), lines


# ----------------------------------------------------------------------------------------------
# damselfly

class Damselfly:
    def __init__(self, binary, work, name, origin):
        self.name = name
        self.data = os.path.join(work, name + "-data")
        os.makedirs(self.data, exist_ok=True)
        self.port, self.hport, self.mport = free_port(), free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.metrics_url = f"http://127.0.0.1:{self.mport}/metrics"
        self.log = os.path.join(work, name + ".log")
        argv = [binary, "mirror",
                "--listen", f"127.0.0.1:{self.port}",
                "--health-listen", f"127.0.0.1:{self.hport}",
                "--metrics-listen", f"127.0.0.1:{self.mport}",
                "--data-dir", self.data,
                "--registry-mirror", origin.url,
                "--insecure-registry", origin.host]
        with open(self.log, "ab") as f:
            f.write(("$ " + " ".join(shlex.quote(a) for a in argv) + "\n").encode())
            f.flush()
            self.proc = CHILDREN.spawn(argv, stdout=f, stderr=subprocess.STDOUT)
        wait_http(self.url + "/v2/", self.proc, f"damselfly {name}", self.log)

    def blob_url(self, digest, origin):
        return f"{self.url}/v2/{REPO}/blobs/{digest}?ns={origin.host}"

    def check_alive(self, when):
        if self.proc.poll() is not None:
            raise BenchError(f"damselfly {self.name} exited unexpectedly (rc={self.proc.returncode}) {when}"
                             + tail_text(self.log))

    def metrics(self):
        self.check_alive("before the metrics scrape")
        try:
            with urllib.request.urlopen(self.metrics_url, timeout=5) as r:
                return r.read().decode()
        except (urllib.error.URLError, OSError) as e:
            self.check_alive("during the metrics scrape")
            raise BenchError(f"metrics scrape {self.metrics_url} failed: {e}")

    def download_bytes_by_source(self):
        out = {}
        for line in self.metrics().splitlines():
            m = re.match(r'damselfly_download_bytes_total\{([^}]*)\}\s+([0-9.eE+-]+)', line)
            if not m:
                continue
            src = re.search(r'source="([^"]*)"', m[1])
            key = src[1] if src else "?"
            out[key] = out.get(key, 0.0) + float(m[2])
        return out

    def stop(self, remove_data=True):
        CHILDREN.stop(self.proc)
        if remove_data:
            shutil.rmtree(self.data, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# nginx: one master with two servers (sendfile on / off) serving the blob file.

class Nginx:
    OUTPUT_BUFFERS = "2 1m"

    def __init__(self, work, serve_dir):
        self.prefix = os.path.join(work, "nginx")
        os.makedirs(self.prefix, exist_ok=True)
        self.port_on, self.port_off = free_port(), free_port()
        self.log = os.path.join(self.prefix, "error.log")
        temp = {k: os.path.join(self.prefix, k) for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")}
        for d in temp.values():
            os.makedirs(d, exist_ok=True)
        user = "user root root;" if os.geteuid() == 0 else ""
        conf = f"""
{user}
worker_processes 1;
pid {self.prefix}/nginx.pid;
error_log {self.log} warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
    default_type application/octet-stream;
    types {{ }}
    client_body_temp_path {temp['client_body']};
    proxy_temp_path {temp['proxy']};
    fastcgi_temp_path {temp['fastcgi']};
    uwsgi_temp_path {temp['uwsgi']};
    scgi_temp_path {temp['scgi']};
    server {{
        listen 127.0.0.1:{self.port_on};
        root {serve_dir};
        sendfile on;
        tcp_nopush on;
    }}
    server {{
        listen 127.0.0.1:{self.port_off};
        root {serve_dir};
        sendfile off;
        output_buffers {self.OUTPUT_BUFFERS};
    }}
}}
"""
        self.conf = os.path.join(self.prefix, "nginx.conf")
        with open(self.conf, "w") as f:
            f.write(conf)
        with open(os.path.join(self.prefix, "stderr.log"), "ab") as f:
            self.proc = CHILDREN.spawn([NGINX, "-c", self.conf, "-p", self.prefix + "/", "-e", self.log,
                                        "-g", "daemon off;"], stdout=f, stderr=subprocess.STDOUT)
        for port in (self.port_on, self.port_off):
            wait_http(f"http://127.0.0.1:{port}/ready.txt", self.proc, "nginx", self.log)

    def stop(self):
        CHILDREN.stop(self.proc)


# ----------------------------------------------------------------------------------------------
# Measurements

class Fetch:
    """One `curl URL | openssl dgst -sha256` pipeline (curl's stdout piped into openssl), timed
    end to end with time.monotonic; curl's -w output goes to its stderr. With hash=False curl
    writes to /dev/null and nothing is hashed (the caller checks the bytes another way)."""

    WRITE_OUT = "%{stderr}\\nBENCH %{http_code} %{time_starttransfer} %{time_total} %{size_download}\\n"

    def __init__(self, url, max_time, hash=True):
        self.url = url
        self.start = time.monotonic()
        self.curl = CHILDREN.spawn(
            ["curl", "-sS", "--max-time", str(int(max_time)), "-w", self.WRITE_OUT, "-o", "-" if hash else "/dev/null",
             url],
            stdout=subprocess.PIPE if hash else subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.ossl = None
        if hash:
            self.ossl = CHILDREN.spawn(["openssl", "dgst", "-sha256", "-r"], stdin=self.curl.stdout,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            self.curl.stdout.close()  # openssl owns the read end now
        self.err_buf = []
        # Drain curl's stderr concurrently so that it can never block.
        self.err_thread = threading.Thread(target=lambda: self.err_buf.append(self.curl.stderr.read()), daemon=True)
        self.err_thread.start()

    def finish(self, timeout):
        hout = b""
        try:
            if self.ossl:
                hout, _ = self.ossl.communicate(timeout=timeout)
            self.curl.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            for p in (self.curl, self.ossl):
                if p:
                    p.kill()
                    p.wait()
            raise BenchError(f"fetch of {self.url} did not finish within {timeout:.0f}s")
        finally:
            for p in (self.curl, self.ossl):
                if p:
                    CHILDREN.forget(p)
        self.wall = time.monotonic() - self.start
        self.err_thread.join(timeout=5)
        err = (self.err_buf[0] if self.err_buf else b"").decode("utf-8", "replace")
        m = re.search(r"BENCH (\d+) ([\d.]+) ([\d.]+) (\d+)", err)
        self.curl_rc = self.curl.returncode
        self.curl_err = err.replace("\n", " | ").strip(" |")
        if m:
            self.code, self.ttfb, self.total, self.size = int(m[1]), float(m[2]), float(m[3]), int(m[4])
        else:
            self.code, self.ttfb, self.total, self.size = 0, float("nan"), float("nan"), 0
        self.hex = hout.decode().split()[0] if hout.strip() else None
        return self

    def ok(self, hexdigest, size):
        hash_ok = self.ossl is None or self.hex == hexdigest
        return self.curl_rc == 0 and self.code == 200 and self.size == size and hash_ok

    def describe(self):
        return (f"curl rc={self.curl_rc} http={self.code} bytes={self.size} sha256={(self.hex or '-')[:16]}… "
                f"curl: {self.curl_err[:300]}")


def throughput(url, size, max_time, proxy=None):
    """MB/s (10^6) of one `curl -o /dev/null` download (through `proxy` if given), checking
    status and size."""
    via = ["--proxy", proxy] if proxy else ["--noproxy", "*"]
    r = run(["curl", "-sS", "--max-time", str(int(max_time)), "-o", "/dev/null", *via,
             "-w", "%{http_code} %{size_download} %{speed_download}", url], timeout=max_time + 30)
    parts = r.stdout.split()
    if r.returncode != 0 or len(parts) != 3 or parts[0] != "200" or int(parts[1]) != size:
        raise BenchError(f"GET {url}: rc={r.returncode} out={r.stdout!r} err={r.stderr.strip()!r}")
    return float(parts[2]) / 1e6


class RssSampler:
    """Peak RssAnon (kB) of one pid, sampled every `interval` s in a thread."""

    def __init__(self, pid, interval=0.02):
        self.pid, self.interval = pid, interval
        self.peak_kb = 0
        self.hwm_kb = 0
        self.samples = 0
        self.stop_ev = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _sample(self):
        try:
            with open(f"/proc/{self.pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):  # kernel-tracked peak of the total RSS
                        self.hwm_kb = int(line.split()[1])
                    elif line.startswith("RssAnon:"):
                        self.peak_kb = max(self.peak_kb, int(line.split()[1]))
                        self.samples += 1
                        return
        except OSError:
            pass

    def _run(self):
        while not self.stop_ev.is_set():
            self._sample()
            self.stop_ev.wait(self.interval)

    def stop(self):
        self._sample()
        self.stop_ev.set()
        self.thread.join(timeout=5)
        return self.peak_kb / 1024.0


def concurrent_fetch(url, clients, max_time):
    """`clients` pipelines started back to back; returns (wall seconds, [Fetch])."""
    t0 = time.monotonic()
    fetches = [Fetch(url, max_time) for _ in range(clients)]
    for f in fetches:
        f.finish(max_time + 60)
    wall = time.monotonic() - t0  # the last pipeline has exited
    return wall, fetches


# ----------------------------------------------------------------------------------------------

def loadavg():
    try:
        with open("/proc/loadavg") as f:
            return f.read().split()[:3]
    except OSError:
        return []


def settle():
    """Before a timed fetch: flush dirty pages (the blob files written so far) and let the machine
    calm down, so that no fetch pays for the previous one's writeback."""
    os.sync()
    time.sleep(SETTLE_S)


def machine_info():
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        nproc = run(["nproc"], timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        nproc = str(os.cpu_count())

    def first_line(argv):
        try:
            r = run(argv, timeout=10)
            return ((r.stdout or "") + (r.stderr or "")).strip().splitlines()[0]
        except (OSError, subprocess.SubprocessError, IndexError):
            return "?"
    return {
        "nproc": nproc,
        "cpu": cpu,
        "kernel": platform.release(),
        "loadavg": loadavg(),
        "curl": first_line(["curl", "--version"]),
        "openssl": first_line(["openssl", "version"]),
        "nginx": first_line([NGINX, "-v"]),
        "docker-registry": first_line(["docker-registry", "--version"]),
    }


def ensure_binary(path):
    if os.path.exists(path):
        return path
    if os.path.abspath(path) != os.path.join(REPO_ROOT, "target", "release", "damselfly"):
        raise BenchError(f"--binary {path} does not exist")
    log(f"{path} missing: cargo build --release -p damselfly")
    r = subprocess.run(["cargo", "build", "--release", "-p", "damselfly"], cwd=REPO_ROOT, timeout=3600)
    if r.returncode != 0 or not os.path.exists(path):
        raise BenchError("cargo build --release -p damselfly failed")
    return path


def write_blob(path, size):
    h = hashlib.sha256()
    chunk = 8 * MIB
    left = size
    with open(path, "wb") as f:
        while left:
            b = os.urandom(min(chunk, left))
            h.update(b)
            f.write(b)
            left -= len(b)
    return h.hexdigest()


def push_blob(origin, path, hexdigest, max_time):
    r = run(["curl", "-sS", "-o", "/dev/null", "-D", "-", "-X", "POST",
             f"{origin.url}/v2/{REPO}/blobs/uploads/"], timeout=30)
    loc = None
    for line in r.stdout.splitlines():
        if line.lower().startswith("location:"):
            loc = line.split(":", 1)[1].strip()
    if r.returncode != 0 or not loc:
        raise BenchError(f"upload POST failed: rc={r.returncode} {r.stdout!r} {r.stderr!r}")
    if loc.startswith("/"):
        loc = origin.url + loc
    sep = "&" if "?" in loc else "?"
    r = run(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", str(int(max_time)),
             "-T", path, "-H", "Content-Type: application/octet-stream", "-X", "PUT",
             f"{loc}{sep}digest=sha256:{hexdigest}"], timeout=max_time + 30)
    if r.returncode != 0 or r.stdout.strip() != "201":
        raise BenchError(f"upload PUT failed: rc={r.returncode} status={r.stdout!r} {r.stderr!r}"
                         + tail_text(origin.log))


def med(xs):
    xs = [x for x in xs if x == x]  # drop NaN
    return statistics.median(xs) if xs else float("nan")


def fmt(x, nd=1):
    return "n/a" if x is None or x != x else f"{x:.{nd}f}"


def verdict(ok):
    return "ok" if ok else "**GOAL MISSED**"


# ----------------------------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=1024, help="blob size in MiB (default 1024)")
    ap.add_argument("--runs", type=int, default=5, help="runs per measurement (default 5)")
    ap.add_argument("--clients", type=int, default=16, help="concurrent cold clients (default 16)")
    ap.add_argument("--binary", default=os.path.join(REPO_ROOT, "target", "release", "damselfly"),
                    help="damselfly binary (default target/release/damselfly; built if missing)")
    ap.add_argument("--json", metavar="OUT", help="also write the results as JSON")
    ap.add_argument("--skip-proxy-reference", action="store_true",
                    help="skip the docker-registry pull-through cache reference")
    ap.add_argument("--keep-temp", action="store_true", help="keep the temp dir (logs) for inspection")
    ap.add_argument("--phases", default="cached,cold,concurrent",
                    help="comma-separated subset of cached,cold,concurrent (default: all)")
    ap.add_argument("--tmp-parent", default=None, help="parent of the temp dir (default $TMPDIR or /tmp)")
    args = ap.parse_args()
    if args.size_mib < 1 or args.runs < 1 or args.clients < 1:
        ap.error("--size-mib, --runs and --clients must be >= 1")
    wanted = [p.strip() for p in args.phases.split(",") if p.strip()]
    unknown = [p for p in wanted if p not in PHASES]
    if unknown:
        ap.error(f"--phases: unknown phase(s) {', '.join(unknown)} (choose from {','.join(PHASES)})")
    if not wanted:
        ap.error(f"--phases: name at least one of {','.join(PHASES)}")
    phases = [p for p in PHASES if p in wanted]  # always run in this order

    for tool in ("curl", "openssl", "docker-registry"):
        if not shutil.which(tool):
            raise BenchError(f"{tool} not found (see scripts/install-test-deps.sh)")
    if not os.access(NGINX, os.X_OK):
        raise BenchError(f"{NGINX} not found: apt-get install nginx-light")
    binary = ensure_binary(os.path.abspath(args.binary))

    size = args.size_mib * MIB
    # Generous bound for any single transfer: 60 s + 1 s per 2 MiB (≥ 2 MB/s even with
    # --clients of them in parallel on a busy machine).
    max_time = 60 + args.size_mib * max(1, args.clients) / 16
    cmdline = " ".join(shlex.quote(a) for a in ["python3", os.path.relpath(sys.argv[0], REPO_ROOT)] + sys.argv[1:])

    work = tempfile.mkdtemp(prefix="damselfly-bench-", dir=args.tmp_parent)
    # A private copy, so that a concurrent `cargo build` cannot swap the binary mid-run.
    shutil.copy2(binary, os.path.join(work, "damselfly"))
    binary = os.path.join(work, "damselfly")
    need = size * (5 if not args.skip_proxy_reference else 4)
    free = shutil.disk_usage(work).free
    if free < need:
        raise BenchError(f"{work}: {free >> 20} MiB free, need about {need >> 20} MiB")

    failed = []  # fatal: damselfly/origin/nginx hash failures
    notes = []  # non-fatal oddities
    cleanup_done = [False]

    def cleanup():
        if cleanup_done[0]:
            return
        cleanup_done[0] = True
        CHILDREN.kill_all()
        if args.keep_temp:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    atexit.register(cleanup)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda s, f: sys.exit(128 + s))

    info = machine_info()
    results = {"command": cmdline, "machine": info, "size_mib": args.size_mib, "runs": args.runs,
               "clients": args.clients, "phases": phases,
               "nginx_sendfile_off": f"output_buffers {Nginx.OUTPUT_BUFFERS}"}
    daemons = []  # every damselfly started, for the log scan at the end
    try:
        # ---------------------------------------------------------------- 1. setup
        serve_dir = os.path.join(work, "www")
        os.makedirs(serve_dir)
        blob_path = os.path.join(serve_dir, "blob.bin")
        log(f"writing a {args.size_mib} MiB random blob")
        hexd = write_blob(blob_path, size)
        digest = "sha256:" + hexd
        blob_prefix = f"/v2/{REPO}/blobs/{digest}"
        origin = Registry(work, "origin")
        log(f"pushing {digest} to the origin {origin.url}")
        t = time.monotonic()
        push_blob(origin, blob_path, hexd, max_time)
        log(f"pushed in {time.monotonic() - t:.1f}s")
        origin_blob_url = origin.url + blob_prefix
        # The log line format, checked on a real line.
        off = origin.log_offset()
        throughput(origin_blob_url, size, max_time)
        origin.settled_bytes_since(off, blob_prefix)
        lines = origin.requests_since(off, blob_prefix, exclude_agent=None)
        if not lines or lines[0] != (200, size):
            raise BenchError(f"origin access log: expected a 'GET {blob_prefix} ... 200 {size}' line, got {lines}"
                             + tail_text(origin.access_log, 5))

        with open(os.path.join(serve_dir, "ready.txt"), "w") as fh:
            fh.write("ok\n")
        nginx = Nginx(work, serve_dir)
        nginx_on = f"http://127.0.0.1:{nginx.port_on}/blob.bin"
        nginx_off = f"http://127.0.0.1:{nginx.port_off}/blob.bin"

        # ---------------------------------------------------------------- 2. cached throughput
        if "cached" in phases:
            log("cached GET throughput")
            warm = Damselfly(binary, work, "warm", origin)
            daemons.append(warm)
            warm_url = warm.blob_url(digest, origin)
            off = origin.log_offset()
            f = Fetch(warm_url, max_time).finish(max_time + 60)
            if not f.ok(hexd, size):
                failed.append(f"damselfly warm-up GET: {f.describe()}")
                raise BenchError(failed[-1] + tail_text(warm.log))
            # (name, url, proxy): the last row reads the same cached blob with the daemon as the
            # client's HTTP proxy (the origin's URL in absolute form, as nydusd's proxy mode asks).
            systems = [("damselfly (cached)", warm_url, None), ("nginx sendfile on", nginx_on, None),
                       (f"nginx sendfile off (output_buffers {Nginx.OUTPUT_BUFFERS})", nginx_off, None),
                       ("docker-registry direct", origin_blob_url, None),
                       ("damselfly (cached, as HTTP proxy)", origin_blob_url, warm.url)]
            speeds = {name: [] for name, _, _ in systems}
            for i in range(args.runs):
                for name, url, proxy in systems:
                    speeds[name].append(throughput(url, size, max_time, proxy))
                log(f"  run {i + 1}/{args.runs}: " + ", ".join(f"{fmt(v[-1], 0)}" for v in speeds.values()) + " MB/s")
            warm_origin_bytes, _ = origin.settled_bytes_since(off, blob_prefix)
            warm_metrics = warm.download_bytes_by_source()
            warm.stop()
            med_speed = {k: med(v) for k, v in speeds.items()}
            names = [n for n, _, _ in systems]
            d_speed, on_speed, off_speed, reg_speed, proxy_speed = (med_speed[n] for n in names)
            best_nginx = max(on_speed, off_speed)
            results["cached"] = {
                "mb_per_s_runs": speeds, "mb_per_s_median": med_speed,
                "origin_copies_incl_warmup": warm_origin_bytes / size,
                "damselfly_download_bytes_by_source": warm_metrics,
                "ratio_vs_best_nginx": d_speed / best_nginx, "ratio_vs_registry": d_speed / reg_speed,
                "proxy_vs_mirror": proxy_speed / d_speed,
            }
            if abs(warm_origin_bytes / size - 1.0) > 0.01:
                notes.append(f"cached phase: origin served {warm_origin_bytes / size:.2f} copies "
                             "(expected 1: the warm-up)")

        # ---------------------------------------------------------------- 3. cold single GET
        if "cold" in phases:
            log("cold single GET")
            cold = {"plain": [], "damselfly": [], "direct": [], "proxy": []}
            cold_ttfb = {"plain": [], "damselfly": [], "direct": [], "proxy": []}
            cold_copies = {"plain": [], "damselfly": [], "proxy": []}
            cold_rss = []
            cold_order = []
            # x_i / direct_i, measured in the same run: "plain" is the goal's measure (the mirror
            # verifies, its client only receives), "damselfly" has the client hash as well.
            paired = {"plain": [], "damselfly": []}

            def cold_through(i, key, hash):
                # damselfly, fresh and empty (the constructor has waited until it answers /v2/)
                m = Damselfly(binary, work, f"cold-{key}{i}", origin)
                daemons.append(m)
                settle()
                m.check_alive("before the cold GET")
                off = origin.log_offset()
                rss = RssSampler(m.proc.pid)
                f = Fetch(m.blob_url(digest, origin), max_time, hash=hash).finish(max_time + 60)
                cold_rss.append(rss.stop())
                if not f.ok(hexd, size):
                    failed.append(f"damselfly cold GET ({key}) run {i + 1}: {f.describe()}")
                    log("HASH/FETCH FAILURE " + failed[-1] + tail_text(m.log))
                cold[key].append(f.wall)
                cold_ttfb[key].append(f.ttfb)
                b, _ = origin.settled_bytes_since(off, blob_prefix)
                cold_copies[key].append(b / size)
                if not hash:
                    # The client did not hash what it received: check the blob the daemon kept
                    # (untimed, from its cache), which is what it served.
                    v = Fetch(m.blob_url(digest, origin), max_time).finish(max_time + 60)
                    if not v.ok(hexd, size):
                        failed.append(f"damselfly cached copy after the cold GET run {i + 1}: {v.describe()}")
                m.stop()

            def cold_direct(i):
                # direct verifying fetch from the origin
                settle()
                f = Fetch(origin_blob_url, max_time).finish(max_time + 60)
                if not f.ok(hexd, size):
                    failed.append(f"direct origin GET run {i + 1}: {f.describe()}")
                    log("HASH/FETCH FAILURE " + failed[-1])
                cold["direct"].append(f.wall)
                cold_ttfb["direct"].append(f.ttfb)

            def cold_proxy(i):
                # docker-registry pull-through cache, fresh and empty (the constructor waits for /v2/)
                p = Registry(work, f"proxy-cold{i}", proxy_remote=origin.url)
                settle()
                off = origin.log_offset()
                f = Fetch(p.url + blob_prefix, max_time).finish(max_time + 60)
                if not f.ok(hexd, size):
                    notes.append(f"reference proxy cold GET run {i + 1} failed: {f.describe()}")
                cold["proxy"].append(f.wall)
                cold_ttfb["proxy"].append(f.ttfb)
                b, _ = origin.settled_bytes_since(off, blob_prefix)
                cold_copies["proxy"].append(b / size)
                p.stop()
                shutil.rmtree(p.dir, ignore_errors=True)

            steps = {"plain": lambda i: cold_through(i, "plain", False),
                     "damselfly": lambda i: cold_through(i, "damselfly", True),
                     "direct": cold_direct, "proxy": cold_proxy}
            for i in range(args.runs):
                # Rotate who goes first, so that no contender always meets the machine in the same
                # state; the reference proxy always goes last.
                base = ["plain", "damselfly", "direct"]
                order = base[i % 3:] + base[:i % 3]
                if not args.skip_proxy_reference:
                    order.append("proxy")
                cold_order.append(order)
                for who in order:
                    steps[who](i)
                for key in paired:
                    paired[key].append(cold[key][-1] / cold["direct"][-1])
                log(f"  run {i + 1}/{args.runs} ({', '.join(order)}): plain {cold['plain'][-1]:.3f}s, "
                    f"hashing {cold['damselfly'][-1]:.3f}s, direct {cold['direct'][-1]:.3f}s, ratios "
                    f"{paired['plain'][-1]:.3f} {paired['damselfly'][-1]:.3f}"
                    + (f", proxy {cold['proxy'][-1]:.3f}s" if cold["proxy"] else ""))
            cd, cdir = med(cold["plain"]), med(cold["direct"])
            td, tdir = med(cold_ttfb["plain"]), med(cold_ttfb["direct"])
            results["cold"] = {
                "wall_s_runs": cold, "ttfb_s_runs": cold_ttfb, "origin_copies_runs": cold_copies,
                "order_runs": cold_order, "settle_before_each_fetch": f"os.sync() + {SETTLE_S:g} s sleep",
                "wall_s_median": {k: med(v) for k, v in cold.items()},
                "ttfb_s_median": {k: med(v) for k, v in cold_ttfb.items()},
                "ratio_plain_vs_direct": cd / cdir,  # ratio of the medians
                "paired_ratio_runs": paired, "paired_ratio_median": {k: med(v) for k, v in paired.items()},
                "ttfb_extra_ms": (td - tdir) * 1000,
                "damselfly_peak_rss_anon_mib_runs": cold_rss,
            }

        # ---------------------------------------------------------------- 4/5. concurrent cold
        if "concurrent" in phases:
            log(f"concurrent cold GETs ({args.clients} clients)")
            conc = {"damselfly": [], "proxy": []}
            conc_copies = {"damselfly": [], "proxy": []}
            conc_heads = {"damselfly": [], "proxy": []}
            conc_rss = []
            conc_hwm = []
            conc_metrics = []
            proxy_failures = []
            for i in range(args.runs):
                m = Damselfly(binary, work, f"conc{i}", origin)
                daemons.append(m)
                off = origin.log_offset()
                rss = RssSampler(m.proc.pid)
                wall, fetches = concurrent_fetch(m.blob_url(digest, origin), args.clients, max_time)
                conc_rss.append(rss.stop())
                conc_hwm.append(rss.hwm_kb / 1024.0)
                if rss.samples < 3:
                    notes.append(f"concurrent run {i + 1}: only {rss.samples} RssAnon samples")
                bad = [f for f in fetches if not f.ok(hexd, size)]
                for f in bad:
                    failed.append(f"damselfly concurrent cold run {i + 1}: {f.describe()}")
                if bad:
                    log(f"HASH/FETCH FAILURE: {len(bad)}/{args.clients} clients failed" + tail_text(m.log))
                conc["damselfly"].append(wall)
                b, _ = origin.settled_bytes_since(off, blob_prefix)
                conc_copies["damselfly"].append(b / size)
                conc_heads["damselfly"].append(len(origin.requests_since(off, blob_prefix, "HEAD")))
                conc_metrics.append(m.download_bytes_by_source())
                m.stop()
                if not args.skip_proxy_reference:
                    p = Registry(work, f"proxy-conc{i}", proxy_remote=origin.url)
                    off = origin.log_offset()
                    wall, fetches = concurrent_fetch(p.url + blob_prefix, args.clients, max_time)
                    bad = [f for f in fetches if not f.ok(hexd, size)]
                    if bad:
                        proxy_failures.append(len(bad))
                        notes.append(f"reference proxy concurrent run {i + 1}: {len(bad)}/{args.clients} clients "
                                     f"failed, e.g. {bad[0].describe()}")
                    conc["proxy"].append(wall)
                    b, _ = origin.settled_bytes_since(off, blob_prefix)
                    conc_copies["proxy"].append(b / size)
                    conc_heads["proxy"].append(len(origin.requests_since(off, blob_prefix, "HEAD")))
                    p.stop()
                    shutil.rmtree(p.dir, ignore_errors=True)
                log(f"  run {i + 1}/{args.runs}: damselfly {conc['damselfly'][-1]:.2f}s "
                    f"{conc_copies['damselfly'][-1]:.2f} copies, peak RssAnon {conc_rss[-1]:.1f} MiB"
                    + (f"; proxy {conc['proxy'][-1]:.2f}s {conc_copies['proxy'][-1]:.2f} copies"
                       if conc["proxy"] else ""))
            results["concurrent"] = {
                "wall_s_runs": conc, "origin_copies_runs": conc_copies, "origin_head_requests_runs": conc_heads,
                "wall_s_median": {k: med(v) for k, v in conc.items()},
                "origin_copies_median": {k: med(v) for k, v in conc_copies.items()},
                "damselfly_peak_rss_anon_mib_runs": conc_rss,
                "damselfly_vm_hwm_mib_runs": conc_hwm,
                "damselfly_download_bytes_by_source_runs": conc_metrics,
            }
        nginx.stop()
        origin.stop()
        info["loadavg_end"] = loadavg()

        # Oddities in the daemons' logs.
        for d in daemons:
            if not os.path.exists(d.log):
                continue
            with open(d.log, "rb") as fh:
                bad_lines = [l for l in fh.read().decode("utf-8", "replace").splitlines()
                             if re.search(r"\b(ERROR|WARN|panicked)\b", l)]
            if bad_lines:
                notes.append(f"{d.name}.log has {len(bad_lines)} WARN/ERROR lines, e.g.: {bad_lines[0][:300]}")
            if d.proc.returncode not in (0, -signal.SIGTERM, None):
                notes.append(f"damselfly {d.name} exited with {d.proc.returncode} on SIGTERM")

        # ---------------------------------------------------------------- report
        results["failures"] = failed
        results["notes"] = notes
        print_report(args, info, cmdline, results, hexd)
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(results, fh, indent=2)
            log(f"wrote {args.json}")
        if failed:
            print("\nFAILED: " + "; ".join(failed))
            for d in daemons:
                print(tail_text(d.log, 20))
            return 1
        return 0
    except BenchError:
        for d in daemons[-1:]:
            print(tail_text(d.log), file=sys.stderr)
        raise
    finally:
        cleanup()


def print_report(args, info, cmdline, r, hexd):
    ref = not args.skip_proxy_reference
    out = []
    w = out.append
    head = f"{args.size_mib} MiB blob, median of {args.runs} runs"
    if "concurrent" in r:
        head += f", {args.clients} concurrent clients"
    w(f"## Blob serving benchmark ({head})")
    w("")
    w(f"Command: `{cmdline}`  ")
    if r["phases"] != list(PHASES):
        w(f"Phases: {', '.join(r['phases'])} (the others were left out with `--phases`)  ")
    w(f"Machine: {info['nproc']} CPUs (`nproc`), {info['cpu']}, Linux {info['kernel']}, "
      f"load average at start {' '.join(info['loadavg'])}, at end {' '.join(info.get('loadavg_end', [])) or '?'}  ")
    w(f"Tools: {info['curl'].split(' (')[0]}, {info['openssl']}, {info['nginx']}, {info['docker-registry']}  ")
    if "cached" in r:
        w(f"nginx sendfile-off server uses `output_buffers {Nginx.OUTPUT_BUFFERS}`; "
          "nginx sendfile-on uses `tcp_nopush on`.")
        c = r["cached"]
        sp = c["mb_per_s_median"]
        names = list(sp)
        d, on, off, reg, proxied = (sp[x] for x in names)
        best = max(on, off)
        w("")
        w("### Cached GET throughput (`curl -o /dev/null`, MB/s = 10^6 B/s)")
        w("")
        w("| server | MB/s (median) | runs |")
        w("|---|---:|---|")
        for name in names:
            w(f"| {name} | {fmt(sp[name], 0)} | {' '.join(fmt(x, 0) for x in c['mb_per_s_runs'][name])} |")
        w("")
        w(f"- damselfly / max(nginx) = {d / best:.2f} (goal ≥ {GOAL_CACHED_VS_NGINX:.2f}): "
          f"{verdict(d >= GOAL_CACHED_VS_NGINX * best)}")
        w(f"- damselfly / docker-registry = {d / reg:.2f} (goal ≥ 1.00): {verdict(d >= reg)}")
        w(f"- damselfly as HTTP proxy / as mirror = {proxied / d:.2f}")
    if "cold" in r:
        k = r["cold"]
        w("")
        w("### Cold GET, one client (wall clock; fresh empty cache per run)")
        w("")
        w("The reference is a direct fetch that verifies (`curl URL | openssl dgst -sha256`), the least work a")
        w("verifying mirror must do. Through damselfly the daemon verifies; the goal's measure has its client")
        w("only receive (`curl -o /dev/null`, the daemon's cached copy hashed afterwards, untimed). The row with")
        w("a hashing client shows the stricter case where the client's hash comes on top.")
        w("")
        w("| path | wall s (median) | TTFB ms (median) | origin copies | runs (s, in run order) |")
        w("|---|---:|---:|---:|---|")
        rows = [("direct from origin registry, verifying", "direct"),
                ("through damselfly (it verifies), client receives", "plain"),
                ("through damselfly, client also hashes", "damselfly")]
        if ref:
            rows.append(("through docker-registry proxy (reference), client hashes", "proxy"))
        for label, key in rows:
            copies = "1.00" if key == "direct" else fmt(med(k["origin_copies_runs"][key]), 2)
            w(f"| {label} | {fmt(k['wall_s_median'][key], 3)} | {fmt(k['ttfb_s_median'][key] * 1000, 1)} | "
              f"{copies} | {' '.join(fmt(x, 3) for x in k['wall_s_runs'][key])} |")
        w("")
        paired, extra = k["paired_ratio_median"], k["ttfb_extra_ms"]
        runs = k["paired_ratio_runs"]
        w(f"- through damselfly / direct verifying fetch, paired ratio median = {paired['plain']:.3f} "
          f"(goal ≤ {GOAL_COLD_RATIO:.2f}): {verdict(paired['plain'] <= GOAL_COLD_RATIO)}; ratio of medians = "
          f"{k['ratio_plain_vs_direct']:.3f}; per run: {' '.join(fmt(x, 3) for x in runs['plain'])}")
        w(f"- with the client hashing too: paired ratio median = {paired['damselfly']:.3f}; per run: "
          f"{' '.join(fmt(x, 3) for x in runs['damselfly'])}")
        w(f"- damselfly TTFB − direct TTFB = {extra:+.1f} ms (goal ≤ +{GOAL_TTFB_EXTRA_MS:.0f} ms): "
          f"{verdict(extra <= GOAL_TTFB_EXTRA_MS)}")
        w(f"- damselfly peak RssAnon during a cold GET: {fmt(max(k['damselfly_peak_rss_anon_mib_runs']), 1)} MiB")
        w("- order: rotated per run among the three (run 1 starts with the receiving client, run 2 with the"
          " hashing one, run 3 direct)"
          + (", the reference proxy last" if ref else "")
          + f"; each timed fetch follows `os.sync()` and a {SETTLE_S:g} s pause")
    if "concurrent" in r:
        n = r["concurrent"]
        w("")
        w(f"### Concurrent cold GETs ({args.clients} clients at once, each piped into `openssl dgst -sha256`)")
        w("")
        w("| path | wall s (median) | origin copies (median) | origin HEADs (median) | peak RssAnon MiB (max) "
          "| runs (s) |")
        w("|---|---:|---:|---:|---:|---|")
        heads = n["origin_head_requests_runs"]
        w(f"| through damselfly | {fmt(n['wall_s_median']['damselfly'], 2)} | "
          f"{fmt(n['origin_copies_median']['damselfly'], 2)} | "
          f"{fmt(med(heads['damselfly']), 0)} | {fmt(max(n['damselfly_peak_rss_anon_mib_runs']), 1)} | "
          f"{' '.join(fmt(x, 2) for x in n['wall_s_runs']['damselfly'])} |")
        if ref:
            w(f"| through docker-registry proxy (reference) | {fmt(n['wall_s_median']['proxy'], 2)} | "
              f"{fmt(n['origin_copies_median']['proxy'], 2)} | {fmt(med(heads['proxy']), 0)} | n/a | "
              f"{' '.join(fmt(x, 2) for x in n['wall_s_runs']['proxy'])} |")
        w("")
        copies = max(n["origin_copies_runs"]["damselfly"])
        rss = max(n["damselfly_peak_rss_anon_mib_runs"])
        w(f"- damselfly origin copies (worst run) = {copies:.2f} (goal ≤ {GOAL_COPIES:.2f}): "
          f"{verdict(copies <= GOAL_COPIES)}")
        w(f"- damselfly peak RssAnon (worst run, sampled every 20 ms) = {rss:.1f} MiB "
          f"(goal ≤ {GOAL_RSS_MIB:.0f} MiB): {verdict(rss <= GOAL_RSS_MIB)}; VmHWM (peak total RSS incl. file-backed pages) "
          f"{max(n['damselfly_vm_hwm_mib_runs']):.1f} MiB")
        last = n["damselfly_download_bytes_by_source_runs"][-1]
        w("- damselfly_download_bytes_total by source (last run): "
          + (", ".join(f"{s}={v / MIB:.1f} MiB" for s, v in sorted(last.items())) or "none"))
    if r["notes"]:
        w("")
        w("### Notes")
        w("")
        for x in r["notes"]:
            w(f"- {x}")
    print("\n".join(out))


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as e:
        print(f"bench: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
