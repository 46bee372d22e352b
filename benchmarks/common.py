"""The harness every benchmark shares (bench_daemon, bench_on_demand, bench_scale).

Time and clocks, percentiles, bounded waits, killing what we started, the timed backend's
records, DEALER sockets and a control client that may have several requests outstanding, the
daemon under test as a subprocess, and the report table. Benchmarks run from the repository
root as ``python -m benchmarks.<name>``; what they start gets the repository on PYTHONPATH
(``clean_env``), so the daemon and the backends import this very source tree.
"""

import contextlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import uuid

import psutil
import zmq

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
MIB = 1024 * 1024
CLK_TCK = os.sysconf("SC_CLK_TCK")
# The reference backend plus a file of timestamps (timed_backend.py): run as a script, so that
# its "start" record is taken before anything is imported.
TIMED_BACKEND = os.path.join(HERE, "timed_backend.py")


# --- small helpers ------------------------------------------------------------------------

def now():
    return time.monotonic()


def pct(values, p):
    """Nearest-rank percentile."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(round(p / 100.0 * len(ordered) + 0.4999999))))
    return ordered[rank - 1]


def ms(seconds):
    return seconds * 1000.0


def read_records(path):
    """[(event, CLOCK_MONOTONIC seconds, pid)] from a timed_backend file, in order."""
    records = []
    try:
        with open(path, encoding="ascii") as stream:
            for line in stream:
                parts = line.split()
                if len(parts) >= 3:
                    records.append((parts[0], float(parts[1]), int(parts[2])))
    except FileNotFoundError:
        pass
    return records


def read_times(path):
    """{event: [times]} from a timed_backend file."""
    events = {}
    for event, moment, _pid in read_records(path):
        events.setdefault(event, []).append(moment)
    return events


def boottime():
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def boot_minus_mono():
    """CLOCK_BOOTTIME - CLOCK_MONOTONIC, to put /proc start times on the monotonic clock."""
    before = time.monotonic()
    boot = boottime()
    after = time.monotonic()
    return boot - (before + after) / 2


def proc_start_boottime(pid):
    """When ``pid`` was created, in CLOCK_BOOTTIME seconds (/proc starttime: clock ticks).
    Raises OSError once it is gone."""
    with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stream:
        rest = stream.read().rsplit(")", 1)[1].split()
    return int(rest[19]) / CLK_TCK       # field 22; rest[0] is field 3


def proc_start_mono(pid):
    """When ``pid`` was created, on CLOCK_MONOTONIC (granularity 1/CLK_TCK s), or None."""
    try:
        return proc_start_boottime(pid) - boot_minus_mono()
    except OSError:
        return None


def wait_for(predicate, timeout, interval=0.002):
    deadline = now() + timeout
    while now() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return predicate()


def clean_env():
    env = dict(os.environ)
    for key in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "BACKEND_MGMT_CONTROL",
                "BACKEND_MGMT_CONFIG", "JOURNAL_STREAM"):
        env.pop(key, None)
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def kill_group(process, grace=3.0):
    """SIGTERM then SIGKILL a process (and its group) we started; bounded."""
    if process is None or process.poll() is not None:
        return
    for signum, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 3.0)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signum)
        try:
            process.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def idle_cpu(ps, seconds):
    before = ps.cpu_times()
    time.sleep(seconds)
    after = ps.cpu_times()
    used = (after.user - before.user) + (after.system - before.system)
    return used, used / seconds * 100.0


def subscribe_events(context, endpoint):
    """A SUB socket on the daemon's event stream (every message)."""
    sock = context.socket(zmq.SUB)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SUBSCRIBE, b"")
    sock.connect(endpoint)
    return sock


class Timeout(Exception):
    pass


def dealer(context, endpoint, **options):
    """A DEALER connected to ``endpoint``, LINGER 0, with further ``options`` (name=value of
    zmq socket options, e.g. rcvtimeo=5000)."""
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    for name, value in options.items():
        sock.setsockopt(getattr(zmq, name.upper()), value)
    sock.connect(endpoint)
    return sock


def status_request(correlation_id):
    """The bytes of a status request, as the CLI sends it."""
    return json.dumps({"command": "status", "params": {},
                       "correlation_id": correlation_id}).encode()


# --- a control client that may have several requests outstanding -------------------------

class Control:
    def __init__(self, context, endpoint):
        self.sock = dealer(context, endpoint)
        self.replies = {}          # correlation_id -> (reply, time received)

    def send(self, command, model=None):
        cid = uuid.uuid4().hex
        params = {"model_name": model} if model is not None else {}
        self.sock.send(json.dumps({"command": command, "params": params,
                                   "correlation_id": cid}).encode())
        return cid, now()

    def poll_once(self, timeout_ms):
        if self.sock.poll(timeout_ms):
            payload = self.sock.recv()
            received = now()
            reply = json.loads(payload)
            self.replies[reply.get("correlation_id")] = (reply, received)
            return True
        return False

    def wait(self, cids, timeout):
        """Wait for all of ``cids``; {cid: (reply, time)}. Raises Timeout."""
        deadline = now() + timeout
        cids = list(cids)
        while any(cid not in self.replies for cid in cids):
            left = deadline - now()
            if left <= 0:
                missing = [cid for cid in cids if cid not in self.replies]
                raise Timeout(f"{len(missing)} of {len(cids)} replies missing after {timeout} s")
            self.poll_once(max(1, int(left * 1000)))
        return {cid: self.replies.pop(cid) for cid in cids}

    def call(self, command, model=None, timeout=10.0):
        cid, sent = self.send(command, model)
        reply, received = self.wait([cid], timeout)[cid]
        return reply, sent, received

    def close(self):
        self.sock.close(linger=0)


# --- the daemon under test -------------------------------------------------------------------

class DaemonProcess:
    """``python -m backend_mgmt serve --config <tmp>/config.yaml`` with its runtime dir in
    ``<tmp>/run`` and its log in ``<tmp>/daemon.log``. Subclasses write the config in
    ``_write_config`` (called by __init__)."""

    def __init__(self, tmp, python=None):
        self.tmp = tmp
        self.python = python or sys.executable
        self.times_dir = os.path.join(tmp, "t")    # timed backends' records, one per model
        os.makedirs(self.times_dir, exist_ok=True)
        self.run_dir = os.path.join(tmp, "run")
        self.config_path = os.path.join(tmp, "config.yaml")
        self.log_path = os.path.join(tmp, "daemon.log")
        self.control_endpoint = "ipc://" + os.path.join(self.run_dir, "control.sock")
        self.events_endpoint = "ipc://" + os.path.join(self.run_dir, "events.sock")
        self.process = None
        self.control = None
        self.ps = None
        self._log = None
        self._write_config()

    def _write_config(self):
        raise NotImplementedError

    def times_file(self, model):
        """Where a timed backend running ``model`` records (its $BENCH_TIMES_FILE)."""
        return os.path.join(self.times_dir, model)

    def clear_times(self, model):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.times_file(model))

    def start(self, context):
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            [self.python, "-m", "backend_mgmt", "serve", "--config", self.config_path],
            cwd=REPO, env=clean_env(), stdin=subprocess.DEVNULL, stdout=self._log,
            stderr=subprocess.STDOUT, start_new_session=True)
        sock_path = os.path.join(self.run_dir, "control.sock")
        if not wait_for(lambda: os.path.exists(sock_path) or self.process.poll() is not None,
                        15.0) or self.process.poll() is not None:
            raise RuntimeError("daemon did not start:\n" + self.log_tail())
        self.control = Control(context, self.control_endpoint)
        reply, _, _ = self.control.call("status", timeout=10.0)
        if not reply.get("success"):
            raise RuntimeError(f"status failed: {reply}")
        self.ps = psutil.Process(self.process.pid)
        return reply

    def log_tail(self, lines=30):
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as stream:
                return "".join(stream.readlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, wait=10.0):
        if self.process is None:
            return
        try:
            if self.process.poll() is None:
                with contextlib.suppress(Exception):
                    self.control.call("stop-service", timeout=3.0)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.process.wait(wait)
        finally:
            kill_group(self.process, grace=2.0)
            with contextlib.suppress(Exception):
                self.control.close()
            if self._log:
                self._log.close()


# --- the report -------------------------------------------------------------------------------

class Table:
    def __init__(self):
        self.rows = []

    def section(self, title):
        self.rows.append((title,))

    def row(self, label, value, target="", ok=None):
        mark = "" if ok is None else ("ok" if ok else "MISS")
        self.rows.append((label, value, target, mark))

    def note(self, text):
        self.rows.append(("  " + text, None))

    def print(self):
        width = max(len(r[0]) for r in self.rows if len(r) == 4) + 2
        vwidth = max(len(r[1]) for r in self.rows if len(r) == 4) + 2
        for r in self.rows:
            if len(r) == 1:
                print(f"\n{r[0]}")
                print("-" * len(r[0]))
            elif len(r) == 2:
                print(r[0])
            else:
                label, value, target, mark = r
                print(f"  {label:<{width}}{value:<{vwidth}}{target:<22}{mark}")


def result_us(seconds):
    return f"{seconds * 1e6:8.1f} us"


def fmt_ms(seconds):
    return f"{ms(seconds):8.2f} ms" if seconds == seconds else "     n/a"


# --- a booted systemd (tests/system/nspawn.py), for what only a real systemd shows -------------

def system_test_module(name):
    """tests/system/NAME.py, loaded by its path: the name `tests` may well be an installed
    package's (mutmut's dependencies bring one), which would hide the repository's."""
    path = os.path.join(REPO, "tests", "system", name + ".py")
    spec = importlib.util.spec_from_file_location(f"system_test_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def tests_module(name):
    """tests/NAME.py (fakes, for benchmarks that drive the real scheduler in-process), loaded
    by its path, as system_test_module does and for the same reason."""
    path = os.path.join(REPO, "tests", name + ".py")
    spec = importlib.util.spec_from_file_location(f"tests_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def build_deb():
    """The .deb of this tree (packaging/build-deb prints its path last)."""
    result = subprocess.run([os.path.join(REPO, "packaging", "build-deb")], check=True,
                            capture_output=True, text=True, stdin=subprocess.DEVNULL,
                            timeout=900)
    return result.stdout.strip().splitlines()[-1]


@contextlib.contextmanager
def booted_container(deb):
    """A container booted with systemd, ``deb`` installed; powered off and removed after.
    Needs root and systemd-nspawn (see tests/system/conftest.py)."""
    nspawn = system_test_module("nspawn")
    problems = nspawn.missing_prerequisites()
    if problems:
        raise SystemExit("cannot boot a container here: " + "; ".join(problems))
    with nspawn.Container(nspawn.ensure_base_root(), debs=[deb]) as container:
        yield container
