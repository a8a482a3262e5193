"""Helpers shared by the benchmark and soak scripts (scripts/bench,
scripts/bench-models, scripts/soak): processes that are always stopped at exit,
free ports, readiness waits, a tandem with a swappable certificate, wrk and
h2load runs and alternating rounds. Loopback only; progress goes to stderr."""

import atexit
import os
import pathlib
import re
import shutil
import signal
import socket
import ssl as ssllib
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parent.parent
TARGET = pathlib.Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
TANDEM = TARGET / "release" / "tandem"
PROCS = []
WORK = pathlib.Path(tempfile.mkdtemp(prefix="tandem-bench-"))


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def cleanup():
    for p in PROCS:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.time() + 10
    for p in PROCS:
        try:
            p.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
    if not os.environ.get("BENCH_KEEP"):
        shutil.rmtree(WORK, ignore_errors=True)
    else:
        log(f"kept {WORK}")


atexit.register(cleanup)
signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))


def install_tools(tools):
    """Installs the Debian packages of the (command, package) pairs whose command is missing.
    apt-get's output goes to stderr: stdout is the report."""
    need = [p for t, p in tools if not shutil.which(t) and not os.path.exists(f"/usr/sbin/{t}")]
    if need:
        log(f"installing {need}")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=True, stdout=sys.stderr)
        subprocess.run(["apt-get", "install", "-y", "-qq", *need], check=True, env=env, stdout=sys.stderr)


def run(cmd, **kw):
    return subprocess.run(cmd, check=True, text=True, capture_output=True, **kw).stdout


_HANDED_OUT = set()


def free_port():
    """A free loopback port, never one this run has handed out before (the
    kernel may give a just-closed port again: two servers would be told the same one)."""
    while True:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def start(cmd, env=None, name=""):
    log(f"start {name}: {' '.join(map(str, cmd))}")
    logf = open(WORK / f"{name or 'proc'}-{len(PROCS)}.log", "w")
    p = subprocess.Popen(cmd, env=env, stdout=logf, stderr=logf, start_new_session=True)
    PROCS.append(p)
    return p


def stop(p):
    if p.poll() is None:
        os.killpg(p.pid, signal.SIGTERM)
        try:
            p.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def wait_url(url, timeout=60):
    ctx = ssllib.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssllib.CERT_NONE
    end = time.time() + timeout
    while time.time() < end:
        try:
            with urllib.request.urlopen(url, timeout=2, context=ctx) as r:
                if r.status == 200:
                    return
        except Exception:
            time.sleep(0.05)
    raise SystemExit(f"{url} did not answer within {timeout}s")


def settle(busy=0.15, timeout=60):
    """Waits until the machine's CPUs are at most `busy` used over half a second (a server
    still working off a previous load's queue would take the next one's cores), up to `timeout`."""
    def ticks():
        f = [int(x) for x in open("/proc/stat").readline().split()[1:]]
        return sum(f), f[3] + f[4]
    end = time.time() + timeout
    while True:
        t0, i0 = ticks()
        time.sleep(0.5)
        t1, i1 = ticks()
        used = 1 - (i1 - i0) / max(1, t1 - t0)
        if used <= busy:
            return
        if time.time() > end:
            log(f"  the machine is still {used:.0%} busy after {timeout}s; measuring anyway")
            return


def rss_kib(pid):
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return 0
    return 0


def descendants(pid):
    out = [pid]
    try:
        kids = open(f"/proc/{pid}/task/{pid}/children").read().split()
    except OSError:
        return out
    for k in kids:
        out += descendants(int(k))
    return out


def process_cpu(p):
    """User + system CPU of process `p` (all its threads), in seconds."""
    fields = open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid):
    """User + system CPU of `pid` and its live descendants, in seconds."""
    total = 0
    for p in descendants(pid):
        try:
            total += process_cpu(p)
        except (OSError, IndexError, ValueError):
            pass
    return total


def by_role(pid):
    """Per role of the tandem tree under `pid` (`engine-worker`, `https-worker`,
    ...; `supervisor` for the rest): (CPU seconds, context switches) summed
    over its processes' threads, switches voluntary and not."""
    out = {}
    for p in descendants(pid):
        try:
            argv = open(f"/proc/{p}/cmdline").read().split("\0")
            role = next((a for a in argv[1:] if a.endswith("-worker")), "supervisor")
            cpu = process_cpu(p)
            switches = 0
            for t in os.listdir(f"/proc/{p}/task"):
                for line in open(f"/proc/{p}/task/{t}/status"):
                    if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                        switches += int(line.split()[1])
        except (OSError, IndexError, ValueError):
            continue
        c, s = out.get(role, (0.0, 0))
        out[role] = (c + cpu, s + switches)
    return out


def wrk_cpu(pid, *args, **kw):
    """wrk(...) plus `cpu_us`: the CPU the tandem tree under `pid` spent per
    request; and per role (`roles`): CPU µs and context switches per request."""
    roles0 = by_role(pid)
    res = wrk(*args, **kw)
    roles1 = by_role(pid)
    n = max(1, res["total"])
    res["cpu_us"] = round((sum(c for c, _ in roles1.values()) - sum(c for c, _ in roles0.values())) * 1e6 / n, 2)
    res["roles"] = {r: (round((c - roles0.get(r, (0, 0))[0]) * 1e6 / n, 1), round((s - roles0.get(r, (0, 0))[1]) / n, 2))
                    for r, (c, s) in roles1.items()}
    return res


def cmdline(pid):
    try:
        return open(f"/proc/{pid}/cmdline").read().replace("\0", " ").strip()
    except OSError:
        return "?"


def wrk_script(body_path, extra_headers=None):
    lua = WORK / f"{body_path.stem}-{len(extra_headers or {})}.lua"
    hdrs = {"content-type": "application/octet-stream" if body_path.suffix == ".bin" else "application/json", **(extra_headers or {})}
    lines = ['wrk.method = "POST"', f'local f = io.open("{body_path}", "rb")', "wrk.body = f:read(\"*a\")", "f:close()"]
    lines += [f'wrk.headers["{k}"] = "{v}"' for k, v in hdrs.items()]
    lua.write_text("\n".join(lines) + "\n")
    return lua


def parse_latency(s):
    m = re.match(r"([\d.]+)(us|ms|s)", s)
    if not m:
        return float("nan")
    v, u = float(m.group(1)), m.group(2)
    return v / 1000 if u == "us" else v if u == "ms" else v * 1000


def wrk(url, lua, conns, seconds, threads=2):
    out = run(["wrk", f"-t{threads}", f"-c{conns}", f"-d{seconds}s", "--latency", "-s", str(lua), url])
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    p50 = parse_latency(re.search(r"\s50%\s+(\S+)", out).group(1))
    p99 = parse_latency(re.search(r"\s99%\s+(\S+)", out).group(1))
    total, failed = wrk_outcome(out)
    return {"rps": rps, "p50": p50, "p99": p99, "errors": failed, "total": total}


def wrk_outcome(out):
    """(requests, failed requests) from wrk's report: socket errors plus non-2xx answers."""
    errors = sum(int(x) for x in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    non2xx = int((re.search(r"Non-2xx or 3xx responses: (\d+)", out) or [0, 0])[1])
    return int(re.search(r"(\d+) requests in", out).group(1)), errors + non2xx


def alternate(rounds, cases):
    """Runs each case once per round, A B A B ..., and returns name -> list of results."""
    results = {name: [] for name, _ in cases}
    for r in range(rounds):
        for name, fn in cases:
            res = fn()
            log(f"  round {r + 1} {name}: {res}")
            results[name].append(res)
    return results


def med(results, key):
    return statistics.median(r[key] for r in results)


def make_cert(kind, name=None):
    """A generated certificate of `kind` (rsa2048 / ecdsa-p256) split into chain and key files."""
    name = name or kind
    cache = WORK / f"certgen-{name}"
    env = {"PATH": os.environ["PATH"], "MODEL_CACHE_DIR": str(cache), "SSL_CERTIFICATE": "GENERATE", "SSL_KEY_TYPE": kind, "ENABLE_SSL": "1", "HOST": "127.0.0.1", "PORT": str(free_port()), "SSL_PORT": str(free_port()), "LOG_LEVEL": "warn"}
    p = start([TANDEM], env=env, name=f"certgen-{kind}")
    wait_url(f"http://127.0.0.1:{env['PORT']}/v2/health/live")
    stop(p)
    live = (cache / "ssl_certificates/live.pem").read_text()
    i = live.index("-----BEGIN CERTIFICATE-----")
    d = WORK / f"cert-{name}"
    d.mkdir()
    (d / "tls.crt").write_text(live[i:])
    (d / "tls.key").write_text(live[:i])
    os.chmod(d / "tls.key", 0o600)
    (d / "combined.pem").write_text(live[i:] + live[:i])
    return d


class Tandem:
    def __init__(self, repo, cert_dir, workers=2, name="tandem", extra=None, binary=None):
        self.http = free_port()
        self.https = free_port()
        self.cache = WORK / f"cache-{name}-{self.http}"
        env = {"PATH": os.environ["PATH"], "HOST": "127.0.0.1", "PORT": str(self.http), "SSL_PORT": str(self.https), "ENABLE_SSL": "1",
               "NUM_WORKERS": str(workers), "MODEL_REPOSITORY": str(repo), "MODEL_CACHE_DIR": str(self.cache),
               "SSL_CERTIFICATE": str(cert_dir / "tls.crt"), "SSL_KEY": str(cert_dir / "tls.key"), "LOG_LEVEL": "warn", **(extra or {})}
        t0 = time.time()
        self.proc = start([binary or TANDEM], env=env, name=name)
        wait_url(f"http://127.0.0.1:{self.http}/v2/health/ready")
        wait_url(f"https://127.0.0.1:{self.https}/v2/health/ready")
        self.startup_s = time.time() - t0

    def stop(self):
        stop(self.proc)


def digits_body():
    path = WORK / "digits.json"
    if not path.exists():
        px = ",".join(["7"] * 64)
        path.write_text('{"inputs":[{"name":"pixels","shape":[1,64],"datatype":"FP32","data":[%s]}]}' % px)
    return path


def large_body(mib):
    """A binary-tensor request for the bench models' `large` (FP32 [1, mib, 512, 512]:
    `mib` channels of 1 MiB): (its file, the length of its JSON header)."""
    path = WORK / f"large-{mib}.bin"
    header = ('{"inputs":[{"name":"image","shape":[1,%d,512,512],"datatype":"FP32","parameters":{"binary_data_size":%d}}]}' % (mib, mib << 20)).encode()
    if not path.exists():
        path.write_bytes(header + bytes(mib << 20))
    return path, len(header)


def h2load(url, body, conns, seconds, streams=10):
    out = run(["h2load", "-D", str(seconds), "-c", str(conns), "-m", str(streams), "-d", str(body), "-H", "content-type: application/json", url])
    rps = float(re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out).group(1))
    mean = re.search(r"time for request:\s+\S+\s+\S+\s+(\S+)", out).group(1)
    failed = int(re.search(r"(\d+) failed", out).group(1))
    return {"rps": rps, "mean": parse_latency(mean), "errors": failed}


def swap_cert_files(src_dir, dst_dir):
    for f in ("tls.crt", "tls.key", "combined.pem"):
        tmp = dst_dir / (f + ".tmp")
        shutil.copyfile(src_dir / f, tmp)
        os.replace(tmp, dst_dir / f)
