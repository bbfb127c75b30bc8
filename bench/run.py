#!/usr/bin/env python3
"""farebox benchmark: farebox against no filter and against Envoy's ext_authz, in one run.

Run it with `make bench`, which builds the release wasm and the release services first.
Standard library only. Everything listens on 127.0.0.1; every load is bounded in time;
every process this script starts is stopped by its pid when it ends (also on errors and
Ctrl-C).

What it does (see bench/README.md for the method):
  1. starts the echo upstream and two reference balance services (one that lets decisions
     be cached, one that does not), all pinned to the load core;
  2. starts one Envoy per scenario (--concurrency 1, pinned to the Envoy core), from
     bench/envoy/*.yaml.in rendered with free ports;
  3. checks each scenario answers as expected, warms each one up, then runs wrk against the
     scenarios interleaved (A B C ... A B C ...) for BENCH_ROUNDS rounds, reading the Envoy's
     CPU time (/proc/<pid>/stat utime+stime) before and after every measured run;
  4. measures Envoy RSS, the decision cache's memory growth for 100,000 distinct credentials,
     and the wasm size (raw and after wasm-opt);
  5. prints a table, writes bench/results.json and bench/RESULTS.md. Targets missed are
     reported as FAIL but do not make the command fail; a broken harness does.

Environment (all optional):
  BENCH_DURATION=10      seconds of each measured run
  BENCH_ROUNDS=3         rounds (every scenario once per round)
  BENCH_CONNECTIONS=32   wrk connections
  BENCH_WARMUP=2         seconds of unmeasured load per scenario before round 1 (0: none)
  BENCH_THREADS=1        wrk threads
  BENCH_SCENARIOS=...    comma-separated subset of the scenario names (default: all)
  BENCH_CACHE_KEYS=100000  distinct credentials of the cache memory test (0: skip the test)
  BENCH_FLEET=4          Envoys of the fleet scenario (lease mode, one shared account; 0: skip)
  BENCH_ENVOY_CPU=0      core of the Envoys;  BENCH_LOAD_CPU=1  core of wrk and the services
  BENCH_OUT_DIR=bench    where results.json and RESULTS.md go
  BENCH_KEEP=1           keep the work directory (configs, logs) even on success
  BENCH_DATABASE_URL     PostgreSQL server of the authorize_pg scenario (default
                         $FAREBOX_TEST_DATABASE_URL, else postgres://postgres@127.0.0.1:5432/test);
                         the bench creates a database fb_bench_<random> there (with psql) and
                         drops it at the end; without a server (or psql) the scenario is skipped
  ENVOY, FAREBOX_WASM, BENCH_BIN_DIR (default target/release), WRK, WASM_OPT
"""

from __future__ import annotations

import datetime
import http.client
import json
import os
import platform
import re
import resource
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")


def env_int(name: str, default: int, minimum: int = 0) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        sys.exit(f"bench: {name}={raw!r} is not an integer")
    if value < minimum:
        sys.exit(f"bench: {name} must be at least {minimum}")
    return value


def env_path(name: str, default: str) -> str:
    value = os.environ.get(name, "").strip() or default
    return value if os.path.isabs(value) else os.path.join(ROOT, value)


DURATION = env_int("BENCH_DURATION", 10, 1)
ROUNDS = env_int("BENCH_ROUNDS", 3, 1)
CONNECTIONS = env_int("BENCH_CONNECTIONS", 32, 1)
WARMUP = env_int("BENCH_WARMUP", 2, 0)
THREADS = env_int("BENCH_THREADS", 1, 1)
CACHE_KEYS = env_int("BENCH_CACHE_KEYS", 100_000, 0)
FLEET = env_int("BENCH_FLEET", 4, 0)
NCPU = os.cpu_count() or 1
ENVOY_CPU = env_int("BENCH_ENVOY_CPU", 0, 0)
LOAD_CPU = env_int("BENCH_LOAD_CPU", 1 if NCPU > 1 else 0, 0)
OUT_DIR = env_path("BENCH_OUT_DIR", "bench")
KEEP = os.environ.get("BENCH_KEEP", "") not in ("", "0")
ENVOY = env_path("ENVOY", ".venv/bin/envoy")
WASM = env_path("FAREBOX_WASM", "build/farebox.wasm")
# The floor: an empty Rust proxy-wasm filter (bench/floor, `make floor`), what any proxy-wasm
# filter costs in Envoy's V8; farebox's own cost is what it adds over this.
FLOOR_WASM = env_path("FLOOR_WASM", "build/floor.wasm")
# The copy of WASM that this run uses (taken at the start, in the work directory), so that a
# rebuild of build/farebox.wasm during the run changes nothing.
WASM_COPY = WASM
# Which source the filter was built from, read when the run starts: the commit, and whether
# the filter's sources had uncommitted changes (the bench measures the working tree).
PROVENANCE: dict = {}
BIN_DIR = env_path("BENCH_BIN_DIR", os.path.join(os.environ.get("CARGO_TARGET_DIR", "target"), "release"))
WRK = os.environ.get("WRK", "").strip() or "wrk"
WASM_OPT = os.environ.get("WASM_OPT", "").strip() or "wasm-opt"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PG_SERVER_URL = (os.environ.get("BENCH_DATABASE_URL", "").strip()
                 or os.environ.get("FAREBOX_TEST_DATABASE_URL", "").strip()
                 or "postgres://postgres@127.0.0.1:5432/test")
PSQL = os.environ.get("PSQL", "").strip() or "psql"

HUGE = 10**12  # balance of the accounts that pay on every request
CHECK_TIMEOUT = 10.0  # seconds for one check request
READY_TIMEOUT = 60.0  # seconds for Envoy to become ready
WRK_GRACE = 30.0  # seconds a wrk run may take beyond its duration before it is killed
MIB = 1024 * 1024

# ---------------------------------------------------------------------------------------
# Scenarios
# ---------------------------------------------------------------------------------------

# service "cached": decisions may be cached (allow, 402 and 401 for 300 s).
# service "live":   nothing is cached; every authorize is a ledger transaction (SQLite).
# service "live_pg": the same on a PostgreSQL ledger (a database of the bench's own).
SCENARIOS = [
    dict(name="nofilter", title="Envoy, no filter", filters="none", service="cached",
         key="bench-allow", path="/v1/bench", expect=200),
    dict(name="floor", title="floor: empty proxy-wasm filter", filters="floor", service="cached",
         key="bench-allow", path="/v1/bench", expect=200),
    dict(name="free", title="farebox, free route", filters="farebox", service="cached",
         key="bench-allow", path="/free/bench", expect=200),
    dict(name="cached_allow", title="farebox, cached allow", filters="farebox", service="cached",
         key="bench-allow", path="/v1/bench", expect=200),
    dict(name="cached_deny", title="farebox, cached deny (402)", filters="farebox",
         service="cached", key="bench-broke", path="/v1/bench", expect=402),
    dict(name="authorize", title="farebox authorize, callout/request", filters="farebox",
         service="live", key="bench-authorize", path="/v1/bench", expect=200),
    dict(name="authorize_pg", title="farebox authorize, PostgreSQL ledger", filters="farebox",
         service="live_pg", key="bench-authorize-pg", path="/v1/bench", expect=200),
    dict(name="lease", title="farebox lease (lease_want 1000)", filters="farebox", service="live",
         key="bench-lease", path="/v1/bench", expect=200, mode="lease"),
    dict(name="ext_authz", title="Envoy ext_authz (HTTP) -> ledger", filters="ext_authz",
         service="live", key="bench-extauthz", path="/v1/bench", expect=200),
]

# Accounts: (service, account id, key, balance)
ACCOUNTS = [
    ("cached", "bench_allow", "bench-allow", HUGE),
    ("cached", "bench_broke", "bench-broke", 0),
    ("live", "bench_authorize", "bench-authorize", HUGE),
    ("live", "bench_lease", "bench-lease", HUGE),
    ("live", "bench_extauthz", "bench-extauthz", HUGE),
    ("live", "bench_fleet", "bench-fleet", HUGE),
    ("live_pg", "bench_authorize_pg", "bench-authorize-pg", HUGE),
]


def plugin_config(mode: str = "authorize", cache_max_entries: int | None = None) -> dict:
    cfg = {
        "cluster": "balance",
        "credential": {"source": "header", "name": "x-api-key"},
        "failure_mode": "closed",
        "timeout_ms": 500,
        "default_cost": 1,
        "routes": [{"name": "free", "prefix": "/free/", "cost": 0}],
    }
    if mode == "lease":
        cfg["mode"] = "lease"
        cfg["lease_want"] = 1000
    if cache_max_entries is not None:
        cfg["cache_max_entries"] = cache_max_entries
    return cfg


# ---------------------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------------------


def log(msg: str) -> None:
    print(f"[bench] {msg}", flush=True)


class Procs:
    """Every process the bench starts; stopped by pid (SIGTERM, then SIGKILL)."""

    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, argv: list[str], log_path: str, cwd: str | None = None,
              env: dict | None = None, stdout_pipe: bool = False) -> subprocess.Popen:
        logf = open(log_path, "ab")
        proc = subprocess.Popen(
            argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if stdout_pipe else logf, stderr=logf)
        logf.close()
        self.procs.append((name, proc))
        return proc

    def stop(self, proc: subprocess.Popen, timeout: float = 5.0) -> None:
        if proc.poll() is None:
            try:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=timeout)
            except ProcessLookupError:
                pass
        self.procs = [(n, p) for (n, p) in self.procs if p is not proc]

    def stop_all(self) -> None:
        for _, proc in reversed(list(self.procs)):
            try:
                self.stop(proc)
            except Exception as e:  # keep stopping the others
                log(f"could not stop pid {proc.pid}: {e}")


PROCS = Procs()


def pinned(cpu: int, argv: list[str]) -> list[str]:
    return ["taskset", "-c", str(cpu)] + argv


def start_service(name: str, binary: str, args: list[str], workdir: str, env: dict | None = None):
    """Starts a service that prints `<name> listening on IP:PORT` on stdout; returns (proc, port)."""
    log_path = os.path.join(workdir, f"{name}.log")
    proc = PROCS.start(name, pinned(LOAD_CPU, [binary] + args), log_path, env=env,
                       stdout_pipe=True)
    box: dict = {}

    def read_first_line() -> None:
        assert proc.stdout is not None
        box["line"] = proc.stdout.readline().decode("utf-8", "replace")
        # Keep draining so the service never blocks on a full pipe.
        for _ in iter(lambda: proc.stdout.read(4096), b""):
            pass

    threading.Thread(target=read_first_line, daemon=True).start()
    deadline = time.monotonic() + 20
    while "line" not in box and time.monotonic() < deadline:
        time.sleep(0.02)
    line = box.get("line", "")
    m = re.match(r"\S+ listening on 127\.0\.0\.1:(\d+)\s*$", line)
    if not m:
        raise RuntimeError(f"{name} did not start (stdout {line!r}); see {log_path}")
    return proc, int(m.group(1))


def http_call(port: int, method: str, path: str, headers: dict | None = None,
              body: bytes | None = None, timeout: float = CHECK_TIMEOUT):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, dict((k.lower(), v) for k, v in resp.getheaders()), data
    finally:
        conn.close()


def admin(port: int, token: str, method: str, path: str, body: dict | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    headers = {"authorization": f"Bearer {token}"}
    if data is not None:
        headers["content-type"] = "application/json"
    status, _, raw = http_call(port, method, path, headers, data)
    if not 200 <= status < 300:
        raise RuntimeError(f"balance admin {method} {path}: {status} {raw[:200]!r}")
    return json.loads(raw) if raw else {}


# ---------------------------------------------------------------------------------------
# Envoy configs
# ---------------------------------------------------------------------------------------


def read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def render(template: str, values: dict[str, str], blocks: dict[str, str]) -> str:
    """Replaces @NAME@ on non-comment lines; a line that is only @BLOCK@ becomes the block's
    lines (comments dropped), indented like the placeholder."""
    out = []
    for line in template.splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            out.append(line)
            continue
        if stripped.startswith("@") and stripped.endswith("@") and stripped[1:-1] in blocks:
            indent = line[: len(line) - len(line.lstrip())]
            for b in blocks[stripped[1:-1]].splitlines():
                if b.strip() and not b.lstrip().startswith("#"):
                    out.append(indent + b)
            continue
        for k, v in values.items():
            line = line.replace(f"@{k}@", v)
        if re.search(r"@[A-Z_]+@", line):
            raise RuntimeError(f"unrendered placeholder in: {line.strip()}")
        out.append(line)
    return "\n".join(out) + "\n"


HCM_KEYS = ["codec_type", "normalize_path", "merge_slashes", "path_with_escaped_slashes_action",
            "use_remote_address", "preserve_external_request_id", "generate_request_id",
            "unix_sockets", "address_prefix", "prefix_len"]


def hcm_settings(yaml_text: str) -> dict:
    found = {}
    for line in yaml_text.splitlines():
        s = line.split("#", 1)[0].strip()
        for k in HCM_KEYS:
            if s.startswith(k + ":"):
                found.setdefault(k, s.split(":", 1)[1].strip())
    return found


def check_hcm_matches_demo() -> None:
    demo = hcm_settings(read(os.path.join(ROOT, "envoy/envoy.yaml")))
    ours = hcm_settings(read(os.path.join(BENCH, "envoy/base.yaml.in")))
    if demo != ours:
        raise RuntimeError(
            "bench/envoy/base.yaml.in must use the HTTP connection manager settings of "
            f"envoy/envoy.yaml: demo {demo}, bench {ours}")


def envoy_yaml(filters: str, balance_port: int, upstream_port: int, plugin: dict | None) -> str:
    block = read(os.path.join(BENCH, f"envoy/filters-{filters}.yaml.in"))
    values = {}
    if filters == "farebox":
        values = {"WASM": os.path.realpath(WASM_COPY),
                  "PLUGIN_CONFIG": json.dumps(json.dumps(plugin, separators=(",", ":")))}
    elif filters == "floor":
        values = {"WASM": os.path.realpath(FLOOR_WASM)}
    block = render(block, values, {})
    return render(read(os.path.join(BENCH, "envoy/base.yaml.in")),
                  {"BALANCE_PORT": str(balance_port), "UPSTREAM_PORT": str(upstream_port)},
                  {"HTTP_FILTERS": block})


class Envoy:
    def __init__(self, name: str, yaml_text: str, workdir: str) -> None:
        self.name = name
        self.dir = os.path.join(workdir, f"envoy-{name}")
        os.makedirs(self.dir, exist_ok=True)
        self.config = os.path.join(self.dir, "envoy.yaml")
        with open(self.config, "w", encoding="utf-8") as f:
            f.write(yaml_text)
        admin_path = os.path.join(self.dir, "admin.txt")
        self.log_path = os.path.join(self.dir, "envoy.log")
        argv = [ENVOY, "-c", self.config, "--concurrency", "1", "--log-level", "warn",
                "--disable-hot-restart", "--admin-address-path", admin_path]
        self.proc = PROCS.start(f"envoy-{name}", pinned(ENVOY_CPU, argv), self.log_path,
                                cwd=self.dir)
        self.pid = self.proc.pid
        deadline = time.monotonic() + READY_TIMEOUT
        self.admin_port = 0
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Envoy {name} exited ({self.proc.returncode}): "
                                   f"{tail(self.log_path)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"Envoy {name} not ready in {READY_TIMEOUT}s: {tail(self.log_path)}")
            try:
                if not self.admin_port:
                    text = read(admin_path).strip()
                    self.admin_port = int(text.rsplit(":", 1)[1])
                status, _, body = http_call(self.admin_port, "GET", "/ready", timeout=2)
                if status == 200 and body.strip() == b"LIVE":
                    break
            except (OSError, ValueError, IndexError, http.client.HTTPException):
                pass
            time.sleep(0.05)
        _, _, body = http_call(self.admin_port, "GET", "/listeners?format=json")
        listeners = json.loads(body)["listener_statuses"]
        self.port = int(listeners[0]["local_address"]["socket_address"]["port_value"])

    def cpu_ticks(self) -> int:
        return cpu_ticks(self.pid)

    def rss_kib(self) -> int:
        return rss_kib(self.pid)

    def counters(self, prefix: str = "wasmcustom.farebox_") -> dict:
        try:
            _, _, body = http_call(self.admin_port, "GET", "/stats?format=json")
            stats = json.loads(body).get("stats", [])
        except (OSError, ValueError, http.client.HTTPException):
            return {}
        out = {}
        for s in stats:
            name = s.get("name", "")
            if name.startswith(prefix) and "value" in s:
                out[name[len(prefix):]] = s["value"]
            elif name.startswith("http.ingress_http.ext_authz.") and "value" in s:
                out[name[len("http.ingress_http."):]] = s["value"]
        return out


def tail(path: str, lines: int = 15) -> str:
    try:
        return "\n".join(read(path).splitlines()[-lines:])
    except OSError:
        return "(no log)"


def cpu_ticks(pid: int) -> int:
    """utime + stime of the whole process (fields 14 and 15 of /proc/<pid>/stat), in ticks."""
    text = read(f"/proc/{pid}/stat")
    fields = text[text.rindex(")") + 2:].split()
    # fields[0] is field 3 (state): field N is fields[N - 3].
    return int(fields[14 - 3]) + int(fields[15 - 3])


def cpu_times() -> dict[int, list[int]]:
    """Per-CPU jiffies from /proc/stat: user nice system idle iowait irq softirq steal."""
    out = {}
    for line in read("/proc/stat").splitlines():
        m = re.match(r"cpu(\d+) (.*)", line)
        if m:
            out[int(m.group(1))] = [int(x) for x in m.group(2).split()[:8]]
    return out


def cpu_shares(before: dict, after: dict, cpu: int) -> dict:
    """Busy and steal shares of one CPU between two cpu_times() readings. Steal is time the
    hypervisor gave to someone else: the noise of a shared machine."""
    d = [a - b for a, b in zip(after.get(cpu, []), before.get(cpu, []))]
    total = sum(d)
    if len(d) < 8 or total <= 0:
        return {"busy": None, "steal": None}
    idle = d[3] + d[4]
    return {"busy": (total - idle - d[7]) / total, "steal": d[7] / total}


def rss_kib(pid: int) -> int:
    for line in read(f"/proc/{pid}/status").splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def redact(url: str) -> str:
    """The URL with its password (if any) hidden."""
    return re.sub(r"^([a-z]+://[^:/@]+):[^@]*@", r"\1:***@", url)


def with_database(url: str, db: str) -> str:
    base, sep, query = url.partition("?")
    scheme, _, rest = base.partition("://")
    host = rest.split("/", 1)[0]
    return f"{scheme}://{host}/{db}" + (sep + query if sep else "")


class PgDatabase:
    """A database of the bench's own on the PostgreSQL server, made and dropped with psql."""

    def __init__(self) -> None:
        self.name = f"fb_bench_{secrets.token_hex(6)}"
        self.url = with_database(PG_SERVER_URL, self.name)
        self.created = False

    def psql(self, sql: str) -> subprocess.CompletedProcess:
        return subprocess.run([PSQL, "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", PG_SERVER_URL,
                               "-c", sql], capture_output=True, text=True, timeout=30,
                              env=dict(os.environ, PGCONNECT_TIMEOUT="5"))

    def create(self) -> str | None:
        """None when it worked, else why not."""
        if not shutil.which(PSQL):
            return f"{PSQL} (the PostgreSQL client) is not installed"
        try:
            p = self.psql(f"CREATE DATABASE {self.name}")
        except subprocess.TimeoutExpired:
            return f"no answer from PostgreSQL at {redact(PG_SERVER_URL)}"
        if p.returncode != 0:
            return f"cannot create a database at {redact(PG_SERVER_URL)}: {p.stderr.strip()[:200]}"
        self.created = True
        return None

    def drop(self) -> None:
        if self.created:
            try:
                p = self.psql(f"DROP DATABASE IF EXISTS {self.name} WITH (FORCE)")
                if p.returncode != 0:
                    log(f"could not drop database {self.name}: {p.stderr.strip()[:200]}")
            except subprocess.TimeoutExpired:
                log(f"could not drop database {self.name}: no answer")
            self.created = False


PG_DATABASES: list[PgDatabase] = []


# ---------------------------------------------------------------------------------------
# Load
# ---------------------------------------------------------------------------------------


def children_cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def wrk_run(port: int, path: str, key: str, seconds: int, workdir: str, label: str) -> dict:
    argv = pinned(LOAD_CPU, [
        WRK, "-t", str(THREADS), "-c", str(CONNECTIONS), "-d", f"{seconds}s", "--timeout", "5s",
        "--latency", "-s", os.path.join(BENCH, "wrk/report.lua"), "-H", f"x-api-key: {key}",
        f"http://127.0.0.1:{port}{path}"])
    cpu_before = children_cpu_s()
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + WRK_GRACE)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"wrk ({label}) did not finish within {seconds + WRK_GRACE}s")
    wrk_cpu_s = children_cpu_s() - cpu_before
    with open(os.path.join(workdir, "wrk.log"), "a", encoding="utf-8") as f:
        f.write(f"==== {label}\n{done.stdout}{done.stderr}\n")
    m = re.search(r"^BENCH_RESULT (\{.*\})$", done.stdout, re.M)
    if done.returncode != 0 or not m:
        raise RuntimeError(f"wrk ({label}) failed ({done.returncode}): {done.stderr.strip()}")
    res = json.loads(m.group(1))
    res["wrk_cpu_s"] = wrk_cpu_s
    return res


def distinct_keys_run(port: int, keys: int, prefix: str, workdir: str, cap_s: int) -> dict:
    """Sends `keys` requests, each with a new credential; bounded by cap_s seconds."""
    env = dict(os.environ, BENCH_KEYS=str(keys), BENCH_KEY_PREFIX=prefix)
    argv = pinned(LOAD_CPU, [
        WRK, "-t", "1", "-c", str(CONNECTIONS), "-d", f"{cap_s}s", "--timeout", "5s",
        "-s", os.path.join(BENCH, "wrk/distinct_keys.lua"), f"http://127.0.0.1:{port}/v1/bench"])
    start = time.monotonic()
    proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    out: list[str] = []

    def reader() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            out.append(line)
            if line.startswith("BENCH_KEYS_DONE") and proc.poll() is None:
                proc.send_signal(signal.SIGINT)  # wrk prints its summary and exits

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    try:
        proc.wait(timeout=cap_s + WRK_GRACE)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise RuntimeError("wrk (distinct keys) did not finish")
    t.join(timeout=5)
    text = "".join(out)
    with open(os.path.join(workdir, "wrk.log"), "a", encoding="utf-8") as f:
        f.write(f"==== distinct keys {prefix}\n{text}\n")
    m = re.search(r"^BENCH_RESULT (\{.*\})$", text, re.M)
    if not m:
        raise RuntimeError(f"wrk (distinct keys) printed no result: {text[-500:]}")
    res = json.loads(m.group(1))
    res["completed"] = "BENCH_KEYS_DONE" in text
    res["wall_s"] = round(time.monotonic() - start, 2)
    return res


# ---------------------------------------------------------------------------------------
# Statistics and targets
# ---------------------------------------------------------------------------------------


def spread(values: list[float]) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "n": len(values)}


def pct(v) -> str:
    return "n/a" if v is None else f"{v * 100:.0f}%"


def fmt(v, digits: int = 1) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, int) or digits == 0:
        return f"{v:,.0f}"
    return f"{v:,.{digits}f}"


def fmt_spread(s: dict, digits: int = 1) -> str:
    if s["median"] is None:
        return "n/a"
    return f"{fmt(s['median'], digits)} ({fmt(s['min'], digits)}–{fmt(s['max'], digits)})"


# ---------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------


def machine_info() -> dict:
    model = ""
    try:
        for line in read("/proc/cpuinfo").splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass

    def version(argv: list[str]) -> str:
        try:
            p = subprocess.run(argv, capture_output=True, text=True, timeout=30)
            text = (p.stdout + p.stderr).strip().splitlines()
            return text[0] if text else ""
        except (OSError, subprocess.TimeoutExpired):
            return ""

    envoy_v = version([ENVOY, "--version"])
    m = re.search(r"version: [0-9a-f]+/([0-9][^/]*)/", envoy_v)
    return {
        "cpus": NCPU, "cpu_model": model, "kernel": platform.release(),
        "envoy": m.group(1) if m else envoy_v,
        "wrk": version([WRK, "--version"]).split(" Copyright")[0],
        "python": platform.python_version(), "clk_tck": CLK_TCK,
    }


def git(*args: str) -> str:
    try:
        p = subprocess.run(["git", "-C", ROOT, *args], capture_output=True, text=True, timeout=30)
        return p.stdout.strip() if p.returncode == 0 else ""
    except (OSError, subprocess.TimeoutExpired):
        return ""


def wasm_sizes(workdir: str) -> dict:
    """The size of the module the bench loaded: `make build` ships it already optimized by
    wasm-opt (build/farebox.wasm), beside the unoptimized build/farebox.raw.wasm. Running
    wasm-opt again here would measure a module nobody ships."""
    import hashlib
    opt = os.path.getsize(WASM_COPY)
    with open(WASM_COPY, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    raw_path = os.path.join(os.path.dirname(WASM), "farebox.raw.wasm")
    raw = os.path.getsize(raw_path) if os.path.exists(raw_path) else None
    out = {"raw_bytes": raw, "opt_bytes": opt, "wasm_opt": None,
           "note": "" if raw is not None else f"no {raw_path}", "sha256": digest, **PROVENANCE}
    exe = shutil.which(WASM_OPT)
    if exe:
        try:
            v = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=30)
            out["wasm_opt"] = v.stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            pass
    return out


def main() -> int:
    t_start = time.monotonic()
    started_at = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    selected = [s.strip() for s in os.environ.get("BENCH_SCENARIOS", "").split(",") if s.strip()]
    names = [s["name"] for s in SCENARIOS]
    for s in selected:
        if s not in names:
            sys.exit(f"bench: unknown scenario {s!r} in BENCH_SCENARIOS (known: {', '.join(names)})")
    scenarios = [dict(s) for s in SCENARIOS if not selected or s["name"] in selected]

    for what, path in [("Envoy", ENVOY), ("farebox.wasm", WASM),
                       ("farebox-balance", os.path.join(BIN_DIR, "farebox-balance")),
                       ("farebox-echo", os.path.join(BIN_DIR, "farebox-echo"))]:
        if not os.path.exists(path):
            sys.exit(f"bench: {what} not found at {path}; run `make bench`")
    for tool in (WRK, "taskset"):
        if not shutil.which(tool):
            sys.exit(f"bench: {tool} not found (apt-get install -y {'wrk' if tool == WRK else 'util-linux'})")
    if max(ENVOY_CPU, LOAD_CPU) >= NCPU:
        sys.exit(f"bench: this machine has {NCPU} CPU(s); set BENCH_ENVOY_CPU / BENCH_LOAD_CPU")
    check_hcm_matches_demo()

    workdir = tempfile.mkdtemp(prefix="farebox-bench-")
    log(f"work directory {workdir} (configs, logs)")
    global WASM_COPY
    WASM_COPY = os.path.join(workdir, "farebox.wasm")
    shutil.copyfile(WASM, WASM_COPY)
    PROVENANCE["git_head"] = git("rev-parse", "--short", "HEAD")
    PROVENANCE["uncommitted_filter_changes"] = bool(
        git("status", "--porcelain", "--", "src", "Cargo.toml", "Cargo.lock"))
    info = machine_info()
    notes: list[str] = []
    if ENVOY_CPU == LOAD_CPU:
        notes.append(f"Envoy and the load share CPU {ENVOY_CPU} (only {NCPU} CPU): numbers are "
                     "much less meaningful")
    ok = False
    try:
        results = run(scenarios, workdir, info, notes, started_at)
        results["wall_s"] = round(time.monotonic() - t_start, 1)
        write_outputs(results)
        ok = True
    finally:
        PROCS.stop_all()
        for db in PG_DATABASES:
            db.drop()
        if ok and not KEEP:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            log(f"kept {workdir}")
    return 0


def run(scenarios: list[dict], workdir: str, info: dict, notes: list[str], started_at) -> dict:
    admin_token = secrets.token_hex(16)
    svc_env = dict(os.environ, FAREBOX_BALANCE_ADMIN_TOKEN=admin_token)
    for k in list(svc_env):
        if k.startswith("FAREBOX_BALANCE_") and k != "FAREBOX_BALANCE_ADMIN_TOKEN":
            del svc_env[k]
    bal = os.path.join(BIN_DIR, "farebox-balance")

    log(f"starting the echo upstream and the balance services on CPU {LOAD_CPU}")
    echo_proc, echo_port = start_service("farebox-echo", os.path.join(BIN_DIR, "farebox-echo"),
                                 ["--listen", "127.0.0.1:0"], workdir)
    live = ["--allow-max-age", "0", "--deny-max-age", "0", "--auth-max-age", "0"]
    service_flags = {
        "cached": ["--allow-max-age", "300", "--deny-max-age", "300", "--auth-max-age", "300"],
        "live": live,
        "live_pg": live,
    }
    services = {}
    pg_skip = None
    if any(sc["service"] == "live_pg" for sc in scenarios):
        db = PgDatabase()
        PG_DATABASES.append(db)
        pg_skip = db.create()
    for sname, flags in service_flags.items():
        if sname == "live_pg":
            if pg_skip is not None or not any(sc["service"] == sname for sc in scenarios):
                continue
            ledger = ["--database-url", PG_DATABASES[0].url]
        else:
            ledger = ["--db", os.path.join(workdir, f"{sname}.sqlite")]
        args = ["--listen", "127.0.0.1:0", *ledger, "--quiet"] + flags
        proc, port = start_service(f"farebox-balance-{sname}", bal, args, workdir, env=svc_env)
        services[sname] = {"port": port, "flags": flags, "pid": proc.pid,
                           "ledger": "postgres" if sname == "live_pg" else "sqlite"}
    if pg_skip is not None:
        notes.append(f"authorize_pg skipped: {pg_skip}")
    for sc in scenarios:
        if sc["service"] not in services:
            sc["skipped"] = pg_skip or f"service {sc['service']} not started"
            log(f"SKIP {sc['name']}: {sc['skipped']}")
    # Everything that runs on the load CPU besides wrk.
    load_pids = [echo_proc.pid] + [v["pid"] for v in services.values()]
    for sname, acct, key, balance in ACCOUNTS:
        if sname in services:
            admin(services[sname]["port"], admin_token, "POST", "/admin/accounts",
                  {"account_id": acct, "key": key, "balance": balance})

    # One Envoy per scenario, all started before any load, all pinned to ENVOY_CPU.
    envoys: dict[str, Envoy] = {}
    account_of = {key: acct for _, acct, key, _ in ACCOUNTS}
    for sc in scenarios:
        sc["account"] = account_of[sc["key"]]
        if sc.get("skipped"):
            continue
        plugin = plugin_config(sc.get("mode", "authorize")) if sc["filters"] == "farebox" else None
        sc["plugin_config"] = plugin
        yaml_text = envoy_yaml(sc["filters"], services[sc["service"]]["port"], echo_port, plugin)
        log(f"starting Envoy for {sc['name']} on CPU {ENVOY_CPU}")
        envoys[sc["name"]] = Envoy(sc["name"], yaml_text, workdir)

    # Does every scenario answer as it should? (The first cached-allow request is the
    # callout that fills the cache; the first cached-deny request the one that caches the 402.)
    active = []
    for sc in scenarios:
        if sc["name"] not in envoys:
            continue
        e = envoys[sc["name"]]
        try:
            status, headers, body = http_call(e.port, "GET", sc["path"], {"x-api-key": sc["key"]})
        except (OSError, http.client.HTTPException) as err:
            status, headers, body = 0, {}, str(err).encode()
        sc["check"] = {"status": status, "body": body[:300].decode("utf-8", "replace")}
        if status != sc["expect"]:
            reason = (f"check request answered {status}, expected {sc['expect']}: "
                      f"{body[:200].decode('utf-8', 'replace')}")
            sc["skipped"] = reason
            log(f"SKIP {sc['name']}: {reason}")
            continue
        if sc["expect"] == 200:
            # The echo upstream shows the request it got: a paid request carries the
            # account the balance service named; a free one (or no filter) none.
            try:
                seen = json.loads(body).get("headers", {}).get("x-farebox-account")
            except ValueError:
                seen = None
            sc["check"]["upstream_account"] = seen
            want = None if sc["name"] in ("nofilter", "floor", "free") else sc["account"]
            if seen != want:
                sc["skipped"] = (f"the upstream saw x-farebox-account {seen!r}, expected {want!r}")
                log(f"SKIP {sc['name']}: {sc['skipped']}")
                continue
        active.append(sc)
    if not active:
        raise RuntimeError("no scenario answered as expected")

    if WARMUP:
        log(f"warm-up: {WARMUP}s per scenario (not measured)")
        for sc in active:
            wrk_run(envoys[sc["name"]].port, sc["path"], sc["key"], WARMUP, workdir,
                    f"warm-up {sc['name']}")

    all_pids = {name: e.pid for name, e in envoys.items()}
    runs: dict[str, list[dict]] = {sc["name"]: [] for sc in active}
    for r in range(ROUNDS):
        for sc in active:
            e = envoys[sc["name"]]
            label = f"round {r + 1}/{ROUNDS} {sc['name']}"
            others_before = {n: cpu_ticks(p) for n, p in all_pids.items() if n != sc["name"]}
            load_before = sum(cpu_ticks(p) for p in load_pids)
            service_pid = services[sc["service"]]["pid"] if sc["filters"] not in ("none", "floor") else None
            service_before = cpu_ticks(service_pid) if service_pid else 0
            sys_before = cpu_times()
            before = e.cpu_ticks()
            t0 = time.monotonic()
            res = wrk_run(e.port, sc["path"], sc["key"], DURATION, workdir, label)
            wall = time.monotonic() - t0
            after = e.cpu_ticks()
            sys_after = cpu_times()
            envoy_core = cpu_shares(sys_before, sys_after, ENVOY_CPU)
            load_core = cpu_shares(sys_before, sys_after, LOAD_CPU)
            load_ticks = sum(cpu_ticks(p) for p in load_pids) - load_before
            service_ticks = cpu_ticks(service_pid) - service_before if service_pid else 0
            others = sum(cpu_ticks(p) - others_before[n] for n, p in all_pids.items()
                         if n != sc["name"])
            n = res["requests"]
            cpu_us = (after - before) * 1e6 / CLK_TCK
            res.update({
                "round": r + 1,
                "rps": n / (res["duration_us"] / 1e6) if res["duration_us"] else 0.0,
                "cpu_ticks": after - before,
                "cpu_us_per_req": cpu_us / n if n else None,
                # The balance service's own CPU (/proc/<pid>/stat) per request: per
                # authorize in the authorize scenarios (one callout per request). Not the
                # PostgreSQL server's, which runs in its own processes.
                "service_cpu_us_per_req": (service_ticks * 1e6 / CLK_TCK / n
                                           if n and service_pid else None),
                "envoy_cpu_util": cpu_us / 1e6 / wall if wall else None,
                "other_envoys_cpu_ms": others * 1000 / CLK_TCK,
                # The load CPU: wrk, the echo upstream and the balance services.
                "load_cpu_util": (res["wrk_cpu_s"] + load_ticks / CLK_TCK) / wall if wall else None,
                "services_cpu_util": load_ticks / CLK_TCK / wall if wall else None,
                "envoy_core_busy": envoy_core["busy"], "envoy_core_steal": envoy_core["steal"],
                "load_core_busy": load_core["busy"], "load_core_steal": load_core["steal"],
            })
            # CPU time on the two cores that none of the bench's processes used (other work on
            # a shared machine): busy share of the core minus what the bench's processes used.
            res.update({
                "envoy_core_foreign": None if envoy_core["busy"] is None else max(
                    0.0, envoy_core["busy"] - res["envoy_cpu_util"]
                    - res["other_envoys_cpu_ms"] / 1000 / wall),
                "load_core_foreign": None if load_core["busy"] is None else max(
                    0.0, load_core["busy"] - res["load_cpu_util"]),
                "wall_s": round(wall, 3),
            })
            runs[sc["name"]].append(res)
            log(f"{label}: {res['rps']:,.0f} req/s, {fmt(res['cpu_us_per_req'], 2)} µs CPU/req, "
                f"p50 {res['lat_p50_us'] / 1000:.2f} ms, p99 {res['lat_p99_us'] / 1000:.2f} ms, "
                f"Envoy CPU {res['envoy_cpu_util'] * 100:.0f}%, load CPU "
                f"{res['load_cpu_util'] * 100:.0f}%, foreign load {pct(res['envoy_core_foreign'])}/"
                f"{pct(res['load_core_foreign'])}, steal {pct(envoy_core['steal'])}/"
                f"{pct(load_core['steal'])}")

    # RSS after the same load, and counters.
    for sc in scenarios:
        if sc["name"] not in envoys:
            continue
        e = envoys[sc["name"]]
        sc["rss_kib"] = e.rss_kib()
        sc["counters"] = e.counters()
    service_stats = {s: admin(v["port"], admin_token, "GET", "/admin/stats") for s, v in services.items()}
    # What the ledger recorded for each scenario's account (proof that the work was done).
    for sc in scenarios:
        if sc["service"] not in services:
            continue
        a = admin(services[sc["service"]]["port"], admin_token, "GET", f"/admin/accounts/{sc['account']}")
        sc["ledger"] = {k: a.get(k) for k in ("balance", "charged", "charges", "leases", "reserved")}
    for s in service_stats.values():
        s.pop("authorize_by_account", None)

    # The Envoys of the scenarios are done: stop them before the memory test.
    for e in envoys.values():
        PROCS.stop(e.proc)

    summary = summarize(active, runs)
    fleet = fleet_test(services["live"]["port"], admin_token, echo_port, workdir) \
        if FLEET else None
    cache = cache_memory_test(services["cached"]["port"], echo_port, workdir) if CACHE_KEYS else None
    sizes = wasm_sizes(workdir)

    results = {
        "started_at": started_at.isoformat(),
        "settings": {
            "duration_s": DURATION, "rounds": ROUNDS, "connections": CONNECTIONS,
            "warmup_s": WARMUP, "wrk_threads": THREADS, "envoy_cpu": ENVOY_CPU,
            "load_cpu": LOAD_CPU, "envoy_concurrency": 1, "cache_keys": CACHE_KEYS,
            "services_cpu": LOAD_CPU,
        },
        "machine": info,
        "services": {k: {"flags": v["flags"], "ledger": v["ledger"]} for k, v in services.items()},
        "postgres": {"server": redact(PG_SERVER_URL), "skipped": pg_skip},
        "service_stats": service_stats,
        "scenarios": [
            {k: sc.get(k) for k in ("name", "title", "filters", "service", "key", "account", "path", "expect",
                                    "plugin_config", "check", "skipped", "rss_kib", "counters", "ledger")}
            | {"runs": runs.get(sc["name"], []), "summary": summary.get(sc["name"])}
            for sc in scenarios
        ],
        "ratios": summary.get("_ratios", {}),
        "wasm": sizes,
        "cache_memory": cache,
        "fleet": fleet,
        "notes": notes,
    }
    # CPU the other (idle) Envoys used while one was measured, as a share of the run time.
    other_ms = [r["other_envoys_cpu_ms"] for rs in runs.values() for r in rs]
    walls = [r["wall_s"] for rs in runs.values() for r in rs]
    results["background"] = {
        "idle_envoys_cpu_ms_per_run_median": statistics.median(other_ms) if other_ms else None,
        "idle_envoys_cpu_share": (sum(other_ms) / 1000 / sum(walls)) if walls else None,
    }
    results["targets"] = targets(results, summary)
    check_statuses(results, notes)
    return results


def summarize(active: list[dict], runs: dict[str, list[dict]]) -> dict:
    out: dict = {}
    base = runs.get("nofilter", [])
    floor = runs.get("floor", [])
    for sc in active:
        rs = runs[sc["name"]]
        s = {
            "rps": spread([r["rps"] for r in rs]),
            "cpu_us_per_req": spread([r["cpu_us_per_req"] for r in rs]),
            "service_cpu_us_per_req": spread([r.get("service_cpu_us_per_req") for r in rs]),
            "lat_p50_ms": spread([r["lat_p50_us"] / 1000 for r in rs]),
            "lat_p99_ms": spread([r["lat_p99_us"] / 1000 for r in rs]),
            "envoy_cpu_util": spread([r["envoy_cpu_util"] for r in rs]),
            "load_cpu_util": spread([r["load_cpu_util"] for r in rs]),
            "steal_max": max([r["envoy_core_steal"] or 0 for r in rs]
                             + [r["load_core_steal"] or 0 for r in rs]),
            "foreign_envoy_core_max": max(r["envoy_core_foreign"] or 0 for r in rs),
            "foreign_load_core_max": max(r["load_core_foreign"] or 0 for r in rs),
            "requests": sum(r["requests"] for r in rs),
            "status_errors": sum(r["status_errors"] for r in rs),
            "socket_errors": sum(r["connect_errors"] + r["read_errors"] + r["write_errors"]
                                 + r["timeouts"] for r in rs),
        }
        if base and sc["name"] != "nofilter":
            # Ratios within each round (same minute, same machine state), then their spread.
            pairs = list(zip(rs, base))
            s["rps_vs_nofilter"] = spread([a["rps"] / b["rps"] for a, b in pairs if b["rps"]])
            s["cpu_vs_nofilter"] = spread([a["cpu_us_per_req"] / b["cpu_us_per_req"]
                                           for a, b in pairs if b["cpu_us_per_req"]])
            s["cpu_delta_vs_nofilter_us"] = spread([a["cpu_us_per_req"] - b["cpu_us_per_req"]
                                                    for a, b in pairs])
        if floor and sc["filters"] == "farebox":
            # What farebox adds over an empty proxy-wasm filter, round by round.
            s["cpu_delta_vs_floor_us"] = spread([a["cpu_us_per_req"] - b["cpu_us_per_req"]
                                                 for a, b in zip(rs, floor)])
            s["cpu_vs_floor"] = spread([a["cpu_us_per_req"] / b["cpu_us_per_req"]
                                        for a, b in zip(rs, floor) if b["cpu_us_per_req"]])
        out[sc["name"]] = s
    ratios = {}

    def paired(a: str, b: str, key: str, op) -> dict | None:
        if a in runs and b in runs:
            return spread([op(x[key], y[key]) for x, y in zip(runs[a], runs[b]) if y[key]])
        return None

    div = lambda x, y: x / y  # noqa: E731
    sub = lambda x, y: x - y  # noqa: E731
    ratios["cached_allow_cpu_minus_free_us"] = paired("cached_allow", "free", "cpu_us_per_req", sub)
    ratios["authorize_cpu_vs_ext_authz"] = paired("authorize", "ext_authz", "cpu_us_per_req", div)
    ratios["authorize_rps_vs_ext_authz"] = paired("authorize", "ext_authz", "rps", div)
    ratios["lease_rps_vs_ext_authz"] = paired("lease", "ext_authz", "rps", div)
    ratios["lease_cpu_vs_ext_authz"] = paired("lease", "ext_authz", "cpu_us_per_req", div)
    ratios["lease_p99_vs_nofilter"] = paired("lease", "nofilter", "lat_p99_us", div)
    ratios["authorize_pg_rps_vs_sqlite"] = paired("authorize_pg", "authorize", "rps", div)
    ratios["authorize_pg_service_cpu_vs_sqlite"] = paired(
        "authorize_pg", "authorize", "service_cpu_us_per_req", div)
    out["_ratios"] = {k: v for k, v in ratios.items() if v is not None}
    return out


def fleet_test(balance_port: int, admin_token: str, echo_port: int, workdir: str) -> dict:
    """FLEET Envoys (lease mode, --concurrency 1 each, all on the Envoy CPU) sharing one
    account, each loaded by its own wrk with CONNECTIONS / FLEET connections at once, for
    ROUNDS rounds of DURATION s. Reported against the single-Envoy lease scenario of the
    same run: lease calls per request, p99, and answers >= 400 (the account never runs out,
    so every refusal is one while credit remained)."""
    plugin = plugin_config("lease")
    envoys = [Envoy(f"fleet-{i}", envoy_yaml("farebox", balance_port, echo_port, plugin), workdir)
              for i in range(FLEET)]
    conns = max(1, CONNECTIONS // FLEET)
    rounds = []
    try:
        for e in envoys:
            status, _, body = http_call(e.port, "GET", "/v1/bench", {"x-api-key": "bench-fleet"})
            if status != 200:
                raise RuntimeError(f"fleet check answered {status}: {body[:200]!r}")
        for r in range(ROUNDS):
            before = admin(balance_port, admin_token, "GET", "/admin/stats")
            results: list[dict] = []
            errors: list[str] = []

            def one(e: Envoy) -> None:
                try:
                    argv = pinned(LOAD_CPU, [
                        WRK, "-t", "1", "-c", str(conns), "-d", f"{DURATION}s", "--timeout", "5s",
                        "--latency", "-s", os.path.join(BENCH, "wrk/report.lua"),
                        "-H", "x-api-key: bench-fleet", f"http://127.0.0.1:{e.port}/v1/bench"])
                    done = subprocess.run(argv, capture_output=True, text=True,
                                          timeout=DURATION + WRK_GRACE)
                    m = re.search(r"^BENCH_RESULT (\{.*\})$", done.stdout, re.M)
                    if done.returncode != 0 or not m:
                        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr.strip()}")
                    results.append(json.loads(m.group(1)))
                except (OSError, RuntimeError, subprocess.TimeoutExpired, ValueError) as err:
                    errors.append(f"{e.name}: {err}")

            threads = [threading.Thread(target=one, args=(e,)) for e in envoys]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            if errors:
                raise RuntimeError("fleet wrk: " + "; ".join(errors))
            after = admin(balance_port, admin_token, "GET", "/admin/stats")
            n = sum(x["requests"] for x in results)
            calls = after["lease_calls"] - before["lease_calls"]
            rnd = {
                "round": r + 1, "requests": n,
                "rps": sum(x["requests"] / (x["duration_us"] / 1e6) for x in results if x["duration_us"]),
                "status_errors": sum(x["status_errors"] for x in results),
                "socket_errors": sum(x["connect_errors"] + x["read_errors"] + x["write_errors"]
                                     + x["timeouts"] for x in results),
                # The slowest Envoy's p99: a conservative figure for the fleet.
                "lat_p99_us": max(x["lat_p99_us"] for x in results),
                "lat_p50_us": statistics.median(x["lat_p50_us"] for x in results),
                "lease_calls": calls, "settle_calls": after["settle_calls"] - before["settle_calls"],
                "lease_calls_per_request": calls / n if n else None,
            }
            rounds.append(rnd)
            log(f"fleet round {r + 1}/{ROUNDS}: {n:,} requests over {FLEET} Envoys, "
                f"{rnd['rps']:,.0f} req/s, p99 {rnd['lat_p99_us'] / 1000:.2f} ms, "
                f"{calls} lease calls ({fmt(rnd['lease_calls_per_request'] or 0, 5)}/request), "
                f"{rnd['status_errors']} answers >= 400")
        counters = [e.counters() for e in envoys]
    finally:
        for e in envoys:
            PROCS.stop(e.proc)
    return {
        "envoys": FLEET, "connections_per_envoy": conns, "rounds": rounds,
        "lease_calls_per_request": spread([x["lease_calls_per_request"] for x in rounds
                                           if x["lease_calls_per_request"] is not None]),
        "lat_p99_ms": spread([x["lat_p99_us"] / 1000 for x in rounds]),
        "rps": spread([x["rps"] for x in rounds]),
        "refused_while_credit_remained": sum(x["status_errors"] for x in rounds),
        "socket_errors": sum(x["socket_errors"] for x in rounds),
        "counters": {k: sum(c.get(k, 0) for c in counters)
                     for k in ("leases_taken", "lease_renewals", "lease_ahead_renewals",
                               "lease_waits", "lease_recalls", "lease_recall_waits", "callouts")},
    }


def fleet_lines(results: dict) -> list[str]:
    fl = results.get("fleet")
    if not fl:
        return ["not run (BENCH_FLEET=0)"]
    out = [f"{fl['envoys']} Envoys (--concurrency 1, all on CPU {ENVOY_CPU}), one account, "
           f"{fl['connections_per_envoy']} connections each: "
           f"{fmt_spread(fl['rps'], 0)} req/s in all, p99 {fmt_spread(fl['lat_p99_ms'], 2)} ms "
           f"(slowest Envoy), lease calls per request {fmt_spread(fl['lease_calls_per_request'], 5)}, "
           f"402s while credit remained {fl['refused_while_credit_remained']}, "
           f"socket errors {fl['socket_errors']}"]
    lease = next((sc for sc in results["scenarios"] if sc["name"] == "lease"), None)
    s = (lease or {}).get("summary")
    if s:
        c = lease.get("counters") or {}
        per = c.get("callouts", 0) / s["requests"] if s.get("requests") else None
        out.append(f"single-Envoy lease scenario of the same run: p99 {fmt_spread(s['lat_p99_ms'], 2)} ms, "
                   f"lease calls per request {fmt(per, 5) if per is not None else 'n/a'}, "
                   f"lease_waits {c.get('lease_waits', 0):,}")
    out.append("fleet counters: " + ", ".join(f"{k} {v:,}" for k, v in fl["counters"].items()))
    return out


def cache_memory_test(balance_port: int, echo_port: int, workdir: str) -> dict:
    """RSS growth of an Envoy after CACHE_KEYS distinct unknown credentials, each of whose
    401 is cacheable (--auth-max-age 300), with cache_max_entries 10000 (the default) and
    100000."""
    out = {"keys": CACHE_KEYS, "runs": []}
    cap_s = max(60, CACHE_KEYS // 1000)
    for entries in (None, 100_000):
        label = "default" if entries is None else str(entries)
        plugin = plugin_config(cache_max_entries=entries)
        e = Envoy(f"cache-{label}", envoy_yaml("farebox", balance_port, echo_port, plugin), workdir)
        try:
            # Steady state first: the VM, the connections, one cached decision.
            wrk_run(e.port, "/v1/bench", "bench-allow", 1, workdir, f"cache-{label} settle")
            time.sleep(0.5)
            before = e.rss_kib()
            log(f"cache memory test (cache_max_entries {entries or '10000 (default)'}): "
                f"{CACHE_KEYS:,} distinct unknown credentials")
            res = distinct_keys_run(e.port, CACHE_KEYS, f"bench-unknown-{label}-", workdir, cap_s)
            time.sleep(1.0)
            after = e.rss_kib()
            counters = e.counters()
            # The same credentials again: served from the cache only if it kept them.
            slots = entries or 10_000
            # Keys land in slots by hash: the expected number of occupied slots after
            # CACHE_KEYS distinct keys (a balls-into-bins estimate).
            occupied = slots * (1 - (1 - 1 / slots) ** CACHE_KEYS)
            run = {
                "cache_max_entries": slots, "configured": entries is not None,
                "rss_before_kib": before, "rss_after_kib": after,
                "growth_kib": after - before, "load": res, "counters": counters,
                "expected_occupied_slots": round(occupied),
                "growth_bytes_per_occupied_slot": (after - before) * 1024 / occupied,
            }
            out["runs"].append(run)
            log(f"  RSS {before / 1024:.1f} -> {after / 1024:.1f} MiB "
                f"(+{(after - before) / 1024:.1f} MiB), {res['requests']:,} requests in "
                f"{res['wall_s']}s, callouts {counters.get('callouts')}, "
                f"401s {counters.get('unauthenticated')}")
        finally:
            PROCS.stop(e.proc)
    return out


def check_statuses(results: dict, notes: list[str]) -> None:
    for sc in results["scenarios"]:
        s = sc.get("summary")
        if not s or not s["requests"]:
            continue
        share = s["status_errors"] / s["requests"]
        if sc["expect"] >= 400 and share < 0.999:
            notes.append(f"{sc['name']}: only {share:.1%} of the answers were errors, expected all {sc['expect']}")
        if sc["expect"] < 400 and s["status_errors"]:
            notes.append(f"{sc['name']}: {s['status_errors']:,} answers with status >= 400 ({share:.2%})")
        if s["socket_errors"]:
            notes.append(f"{sc['name']}: {s['socket_errors']:,} socket errors/timeouts in wrk")
        if s["foreign_envoy_core_max"] > 0.05 or s["foreign_load_core_max"] > 0.10:
            notes.append(f"{sc['name']}: other processes on the machine used up to "
                         f"{pct(s['foreign_envoy_core_max'])} of the Envoy CPU and "
                         f"{pct(s['foreign_load_core_max'])} of the load CPU during a round")
    cache = results.get("cache_memory") or {}
    for r in cache.get("runs", []):
        if not r["load"]["completed"]:
            notes.append(f"cache memory test (cache_max_entries {r['cache_max_entries']:,}): wrk "
                         f"stopped at its time cap before {CACHE_KEYS:,} answers")
        if r["load"]["status_errors"] < 0.99 * r["load"]["requests"]:
            notes.append(f"cache memory test (cache_max_entries {r['cache_max_entries']:,}): "
                         "not every answer was a 401")


def targets(results: dict, summary: dict) -> list[dict]:
    out = []

    def med(name: str, key: str):
        s = summary.get(name)
        return s[key]["median"] if s and s.get(key) else None

    def add(name: str, measured, limit, ok, unit: str = "") -> None:
        status = "n/a" if ok is None else ("PASS" if ok else "FAIL")
        out.append({"target": name, "measured": measured, "limit": limit, "status": status,
                    "unit": unit})

    ca_cpu, nf_cpu, fr_cpu = (med("cached_allow", "cpu_us_per_req"), med("nofilter", "cpu_us_per_req"),
                              med("free", "cpu_us_per_req"))
    d_nf = summary.get("cached_allow", {}).get("cpu_delta_vs_nofilter_us", {}).get("median")
    add("cached allow: Envoy CPU/request ≤ no filter + 6 µs", d_nf, 6.0,
        None if d_nf is None else d_nf <= 6.0, "µs more than no filter")
    d_fr = summary["_ratios"].get("cached_allow_cpu_minus_free_us", {}).get("median")
    add("cached allow: Envoy CPU/request ≤ free route + 2 µs", d_fr, 2.0,
        None if d_fr is None else d_fr <= 2.0, "µs more than free route")
    r = summary.get("cached_allow", {}).get("rps_vs_nofilter", {}).get("median")
    add("cached allow: requests/s ≥ 0.85 × no filter", r, 0.85, None if r is None else r >= 0.85, "×")
    r = summary.get("cached_deny", {}).get("rps_vs_nofilter", {}).get("median")
    add("cached deny: requests/s ≥ no filter", r, 1.0, None if r is None else r >= 1.0, "×")
    r = summary["_ratios"].get("authorize_cpu_vs_ext_authz", {}).get("median")
    add("authorize mode: Envoy CPU/request ≤ 0.9 × ext_authz", r, 0.9,
        None if r is None else r <= 0.9, "×")
    r = summary["_ratios"].get("lease_rps_vs_ext_authz", {}).get("median")
    add("lease mode: requests/s ≥ 2 × ext_authz", r, 2.0, None if r is None else r >= 2.0, "×")
    r = summary["_ratios"].get("lease_p99_vs_nofilter", {}).get("median")
    add("lease mode: p99 ≤ 1.3 × no filter", r, 1.3, None if r is None else r <= 1.3, "×")
    fl = results.get("fleet")
    if fl:
        n = fl["refused_while_credit_remained"]
        add(f"fleet ({fl['envoys']} Envoys, one account): 402s while credit remained = 0", n, 0,
            n == 0, "answers")
    opt = results["wasm"]["opt_bytes"]
    add("farebox.wasm ≤ 250 KB (250,000 bytes) after wasm-opt -Oz", opt, 250_000,
        None if opt is None else opt <= 250_000, "bytes")
    cache = results.get("cache_memory")
    if cache and cache["runs"]:
        big = [r for r in cache["runs"] if r["cache_max_entries"] >= CACHE_KEYS]
        small = [r for r in cache["runs"] if r["cache_max_entries"] < CACHE_KEYS]
        g = big[0]["growth_kib"] / 1024 if big else None
        add(f"RSS growth for {CACHE_KEYS:,} distinct cached credentials ≤ 32 MiB", g, 32.0,
            None if g is None else g <= 32.0, "MiB")
        if big and small:
            gs, gb = small[0]["growth_kib"], big[0]["growth_kib"]
            # Bounded by the configured size: the default 10,000-slot table grows by at most
            # half of what the 100,000-slot table does for the same 100,000 credentials.
            ok = gs <= max(0.5 * gb, 2048)
            add("RSS growth bounded by cache_max_entries (10,000 slots: ≤ half the 100,000-slot growth)",
                gs / 1024, round(max(0.5 * gb, 2048) / 1024, 1), ok, "MiB")
    else:
        add("RSS growth for 100,000 distinct cached credentials ≤ 32 MiB", None, 32.0, None, "MiB")
    return out


# ---------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------


def table_rows(results: dict) -> list[list[str]]:
    rows = [["scenario", "req/s median (min–max)", "× no filter", "Envoy CPU µs/req (min–max)",
             "Δ µs vs no filter", "Δ µs vs floor", "p50 ms", "p99 ms", "Envoy CPU", "load CPU", "foreign max",
             "RSS MiB", "service CPU µs/req"]]
    for sc in results["scenarios"]:
        s = sc.get("summary")
        if sc.get("skipped") or not s:
            rows.append([sc["title"], f"skipped: {sc.get('skipped') or 'not run'}"[:160]] + [""] * 11)
            continue
        rows.append([
            sc["title"],
            fmt_spread(s["rps"], 0),
            fmt(s.get("rps_vs_nofilter", {}).get("median"), 2) if "rps_vs_nofilter" in s else "1",
            fmt_spread(s["cpu_us_per_req"], 2),
            fmt(s["cpu_delta_vs_nofilter_us"]["median"], 2) if "cpu_delta_vs_nofilter_us" in s else "0",
            (fmt(s["cpu_delta_vs_floor_us"]["median"], 2) if "cpu_delta_vs_floor_us" in s
             else ("0" if sc["name"] == "floor" else "—")),
            fmt(s["lat_p50_ms"]["median"], 2),
            fmt(s["lat_p99_ms"]["median"], 2),
            f"{s['envoy_cpu_util']['median'] * 100:.0f}%",
            f"{s['load_cpu_util']['median'] * 100:.0f}%",
            f"{pct(s['foreign_envoy_core_max'])}/{pct(s['foreign_load_core_max'])}",
            fmt(sc["rss_kib"] / 1024, 1) if sc.get("rss_kib") else "n/a",
            fmt_spread(s["service_cpu_us_per_req"], 1) if sc["filters"] not in ("none", "floor") else "—",
        ])
    return rows


def text_table(rows: list[list[str]]) -> str:
    full = [r for r in rows if not (len(r) > 1 and r[1].startswith("skipped"))]
    widths = [max(len(r[i]) for r in full) for i in range(len(rows[0]))]
    lines = []
    for j, r in enumerate(rows):
        if len(r) > 1 and r[1].startswith("skipped"):
            lines.append(f"{r[0].ljust(widths[0])}  {r[1]}")
        else:
            lines.append("  ".join(c.ljust(widths[i]) if i == 0 else c.rjust(widths[i])
                                   for i, c in enumerate(r)))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def md_table(rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(rows[0]) + " |", "|" + "|".join(["---"] + ["---:"] * (len(rows[0]) - 1)) + "|"]
    for r in rows[1:]:
        out.append("| " + " | ".join(c.replace("|", "\\|") for c in r) + " |")
    return "\n".join(out)


def fmt_measured(t: dict) -> str:
    m = t["measured"]
    if m is None:
        return "n/a"
    if t["unit"] == "bytes":
        return f"{m:,} bytes"
    if t["unit"] == "×":
        return f"{m:.2f}×"
    return f"{m:.2f} {t['unit']}"


def ratio_lines(results: dict) -> list[str]:
    names = {
        "cached_allow_cpu_minus_free_us": ("cached allow − free route, Envoy CPU µs/request", 2),
        "authorize_cpu_vs_ext_authz": ("authorize / ext_authz, Envoy CPU per request", 2),
        "authorize_rps_vs_ext_authz": ("authorize / ext_authz, requests/s", 2),
        "lease_rps_vs_ext_authz": ("lease / ext_authz, requests/s", 2),
        "lease_cpu_vs_ext_authz": ("lease / ext_authz, Envoy CPU per request", 2),
        "lease_p99_vs_nofilter": ("lease / no filter, p99 latency", 2),
        "authorize_pg_rps_vs_sqlite": ("authorize, PostgreSQL / SQLite ledger, requests/s", 2),
        "authorize_pg_service_cpu_vs_sqlite": (
            "authorize, PostgreSQL / SQLite ledger, balance-service CPU per authorize", 2),
    }
    out = []
    for sc in results["scenarios"]:
        s = sc.get("summary")
        if s and "rps_vs_nofilter" in s:
            out.append(f"{sc['title']} / no filter: requests/s {fmt_spread(s['rps_vs_nofilter'], 2)}, "
                       f"Envoy CPU per request {fmt_spread(s['cpu_vs_nofilter'], 2)}")
    for sc in results["scenarios"]:
        s = sc.get("summary")
        if s and "cpu_vs_floor" in s:
            out.append(f"{sc['title']} / floor: Envoy CPU per request {fmt_spread(s['cpu_vs_floor'], 2)}, "
                       f"Δ {fmt_spread(s['cpu_delta_vs_floor_us'], 2)} µs")
    for k, (title, d) in names.items():
        v = results["ratios"].get(k)
        if v:
            out.append(f"{title}: {fmt_spread(v, d)}")
    return out


def backend_lines(results: dict) -> list[str]:
    """Authorize (one ledger transaction per request) on each backend, same run."""
    out = []
    for sc in results["scenarios"]:
        if sc["name"] not in ("authorize", "authorize_pg"):
            continue
        ledger = "PostgreSQL" if sc["service"] == "live_pg" else "SQLite"
        s = sc.get("summary")
        if sc.get("skipped") or not s:
            out.append(f"{ledger}: skipped ({sc.get('skipped') or 'not run'})")
            continue
        out.append(f"{ledger}: {fmt_spread(s['rps'], 0)} authorizes/s, balance service "
                   f"{fmt_spread(s['service_cpu_us_per_req'], 1)} µs CPU per authorize, "
                   f"p50 {fmt(s['lat_p50_ms']['median'], 2)} ms, p99 "
                   f"{fmt(s['lat_p99_ms']['median'], 2)} ms")
    return out


def memory_lines(results: dict) -> list[str]:
    out = []
    w = results["wasm"]
    raw = f"{w['raw_bytes']:,} bytes" if w["raw_bytes"] else f"n/a ({w['note']})"
    out.append(f"farebox.wasm (as loaded, after `make build`'s `wasm-opt -Oz`): {w['opt_bytes']:,} bytes; "
               f"unoptimized build/farebox.raw.wasm {raw}"
               + (f" ({w['wasm_opt']})" if w.get("wasm_opt") else "")
               + f"; built from {w.get('git_head') or 'an unknown commit'}"
               + (" with uncommitted changes to the filter's sources"
                  if w.get("uncommitted_filter_changes") else ""))
    rss = {sc["name"]: sc.get("rss_kib") for sc in results["scenarios"]}
    if rss.get("nofilter") and rss.get("cached_allow"):
        out.append(f"Envoy RSS after the same load: no filter {rss['nofilter'] / 1024:.1f} MiB, "
                   f"farebox (cached allow) {rss['cached_allow'] / 1024:.1f} MiB "
                   f"(+{(rss['cached_allow'] - rss['nofilter']) / 1024:.1f} MiB)")
    cache = results.get("cache_memory")
    if cache:
        for r in cache["runs"]:
            c = r["counters"]
            out.append(
                f"{cache['keys']:,} distinct unknown credentials (401 cacheable 300 s), "
                f"cache_max_entries {r['cache_max_entries']:,}{'' if r['configured'] else ' (default)'}: "
                f"RSS {r['rss_before_kib'] / 1024:.1f} → {r['rss_after_kib'] / 1024:.1f} MiB, "
                f"growth {r['growth_kib'] / 1024:.1f} MiB "
                f"(≈ {r['growth_bytes_per_occupied_slot']:.0f} bytes per occupied slot, "
                f"≈ {r['expected_occupied_slots']:,} slots expected occupied); "
                f"{r['load']['requests']:,} requests in {r['load']['wall_s']} s, "
                f"callouts {c.get('callouts', 'n/a')}, 401 answers {c.get('unauthenticated', 'n/a')}")
    return out


def write_outputs(results: dict) -> None:
    os.makedirs(OUT_DIR, exist_ok=True)
    rows = table_rows(results)
    st = results["settings"]
    m = results["machine"]
    head = (f"{ROUNDS} round(s) × {DURATION} s per scenario, {CONNECTIONS} connections, "
            f"{st['warmup_s']} s warm-up; Envoy {m['envoy']} --concurrency 1 on CPU {ENVOY_CPU}; "
            f"wrk, echo and balance services on CPU {LOAD_CPU}")
    tgt_lines = [f"{t['status']:4}  {t['target']}: {fmt_measured(t)}" for t in results["targets"]]
    bg = results["background"]
    bg_line = (f"Idle Envoys (the other scenarios') used {bg['idle_envoys_cpu_share'] * 100:.2f}% of "
               f"CPU {ENVOY_CPU} during the measured runs" if bg.get("idle_envoys_cpu_share") is not None
               else "")

    print()
    print(f"farebox bench — {head}")
    print(text_table(rows))
    print()
    print("Ratios (median of the per-round ratios, min–max):")
    for line in ratio_lines(results):
        print(f"  {line}")
    print()
    print("Fleet:")
    for line in fleet_lines(results):
        print(f"  {line}")
    print()
    print("Ledger backends (authorize mode, release build of the service):")
    for line in backend_lines(results):
        print(f"  {line}")
    print()
    print("Memory and size:")
    for line in memory_lines(results):
        print(f"  {line}")
    print()
    print("Targets:")
    for line in tgt_lines:
        print(f"  {line}")
    if bg_line:
        print(f"\n{bg_line}")
    for n in results["notes"]:
        print(f"note: {n}")

    with open(os.path.join(OUT_DIR, "results.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2, sort_keys=False, ensure_ascii=False)
        f.write("\n")

    md = [
        "# farebox benchmark results",
        "",
        f"Written by `make bench` (bench/run.py) on {results['started_at']}, in {results['wall_s']} s. "
        "Machine-readable: [results.json](results.json). Method: [README.md](README.md).",
        "",
        f"- Machine: {m['cpus']} CPUs ({m['cpu_model']}), Linux {m['kernel']}, CLK_TCK {m['clk_tck']}; "
        "shared and noisy, so compare ratios measured in the same run rather than absolute numbers.",
        f"- {head}.",
        f"- Load: {m['wrk']}, {THREADS} thread(s), `GET` with an `x-api-key` header; the echo upstream "
        "answers every request with a small JSON body.",
        "- Envoy CPU per request: utime+stime of the Envoy process (/proc/<pid>/stat) over the "
        "measured run, divided by the requests wrk completed.",
        "",
        md_table(rows),
        "",
        "Columns: *× no filter*, *Δ µs vs no filter* and *Δ µs vs floor* are the medians of the "
        "per-round ratios and differences against the no-filter run (and the floor's, an empty "
        "Rust proxy-wasm filter) of the same round. *Envoy CPU* is the Envoy "
        f"process's CPU time over the run's wall time (100% = all of CPU {ENVOY_CPU}); *load CPU* "
        f"is wrk + echo + balance services over wall time (100% = all of CPU {LOAD_CPU}): when it "
        "is near 100% the load side, not Envoy, set the pace. *foreign max* is the largest share "
        "of each CPU (Envoy's / load's) that processes outside the bench used during a round of "
        "that scenario. *RSS* is the Envoy's VmRSS after all its rounds.",
        "",
        "## Ratios (same run)",
        "",
        "Median of the per-round ratios, with their min–max.",
        "",
    ]
    md += [f"- {line}" for line in ratio_lines(results)]
    md += ["", "## Ledger backends (same run)", "",
           "Authorize mode: one `/v1/authorize` ledger transaction per request. Balance-service "
           "CPU is that process's utime+stime per request; PostgreSQL's own CPU (its server "
           "processes, not pinned) is not included.", ""]
    md += [f"- {line}" for line in backend_lines(results)]
    md += ["", "## Targets", "", "| | target | measured |", "|---|---|---|"]
    md += [f"| {t['status']} | {t['target']} | {fmt_measured(t)} |" for t in results["targets"]]
    md += ["", "## Fleet (lease mode, Envoys sharing one account)", ""]
    md += [f"- {line}" for line in fleet_lines(results)]
    md += ["", "## Memory and size", ""]
    md += [f"- {line}" for line in memory_lines(results)]
    md += ["", "## Notes", ""]
    if bg_line:
        md.append(f"- {bg_line}.")
    svc = results["service_stats"]
    for name, stats in svc.items():
        md.append(f"- Balance service `{name}` ({' '.join(results['services'][name]['flags'])}) calls: "
                  + ", ".join(f"{k} {v:,}" for k, v in stats.items() if isinstance(v, int)))
    for sc in results["scenarios"]:
        c = sc.get("counters") or {}
        if c:
            keep = {k: v for k, v in c.items() if v}
            md.append(f"- `{sc['name']}` counters: " + ", ".join(f"{k} {v:,}" for k, v in keep.items()))
        led = sc.get("ledger") or {}
        if sc["service"] == "live" and led:
            md.append(f"- `{sc['name']}` ledger of `{sc['account']}`: "
                      + ", ".join(f"{k} {v:,}" for k, v in led.items() if isinstance(v, int)))
        if sc.get("skipped"):
            md.append(f"- `{sc['name']}` skipped: {sc['skipped']}")
    for n in results["notes"]:
        md.append(f"- {n}")
    with open(os.path.join(OUT_DIR, "RESULTS.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(md) + "\n")
    log(f"wrote {os.path.relpath(os.path.join(OUT_DIR, 'results.json'), ROOT)} and "
        f"{os.path.relpath(os.path.join(OUT_DIR, 'RESULTS.md'), ROOT)}")


def on_signal(signum, _frame):
    raise KeyboardInterrupt(f"signal {signum}")


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, on_signal)
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        PROCS.stop_all()
        sys.exit(130)
    except RuntimeError as e:
        PROCS.stop_all()
        print(f"bench: error: {e}", file=sys.stderr)
        sys.exit(1)
