"""Helpers shared by the benchmark scripts (scripts/bench, scripts/bench-models):
processes that are always stopped at exit, free ports, readiness waits, wrk
runs and alternating rounds. Loopback only; progress goes to stderr."""

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


def run(cmd, **kw):
    return subprocess.run(cmd, check=True, text=True, capture_output=True, **kw).stdout


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
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
    errors = sum(int(x) for x in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    non2xx = int((re.search(r"Non-2xx or 3xx responses: (\d+)", out) or [0, 0])[1])
    total = int(re.search(r"(\d+) requests in", out).group(1))
    return {"rps": rps, "p50": p50, "p99": p99, "errors": errors + non2xx, "total": total}


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
