"""Starts the real daemon (``python -m backend_mgmt serve``) and talks to it over its sockets."""

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid

import psutil
import yaml
import zmq

from backend_mgmt import wire
from backend_mgmt.messages import Ping, Pong, Request, Response

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFERENCE = ["{python}", "-m", "backend_mgmt.reference_backend"]


def wait_until(predicate, timeout, interval=0.01, message="condition"):
    """Poll ``predicate`` until it returns a true value; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {message}")
        time.sleep(interval)


def short_tempdir():
    # ipc:// paths must fit in 107 bytes; pytest's tmp_path can be longer.
    return tempfile.mkdtemp(prefix="bm-", dir="/tmp")


def make_config(directory, models=None, backends=None, **extra):
    """A config dict using the reference backend; ``models`` maps name -> extra args."""
    backends = backends or {"reference": {"command": REFERENCE, "startup_timeout": 10,
                                          "stop_timeout": 3}}
    models = models if models is not None else {"demo": []}
    document = {
        "runtime_dir": os.path.join(directory, "run"),
        "model_backends": backends,
        "supported_models": [
            {"name": name, "type": "reference", **({"args": args} if args else {})}
            for name, args in models.items()],
        **extra,
    }
    return document


class Daemon:
    """``preamble``: Python code the daemon's process runs before serving (fault injection:
    a test that uses it says what it replaces and why). ``nofile``: (soft, hard)
    RLIMIT_NOFILE the daemon starts with."""

    def __init__(self, document, directory=None, env=None, preamble=None, nofile=None):
        self.preamble = preamble
        self.nofile = nofile
        self.directory = directory or short_tempdir()
        self.owns_directory = directory is None
        self.config_path = os.path.join(self.directory, "config.yaml")
        with open(self.config_path, "w") as stream:
            yaml.safe_dump(document, stream)
        self.runtime_dir = document.get("runtime_dir", os.path.join(self.directory, "run"))
        self.control_endpoint = document.get("endpoints", {}).get(
            "cli_management", f"ipc://{self.runtime_dir}/control.sock")
        self.handshake_endpoint = document.get("endpoints", {}).get(
            "client_handshake", f"ipc://{self.runtime_dir}/handshake.sock")
        self.log_path = os.path.join(self.directory, "daemon.log")
        self.env = {**os.environ, "PYTHONPATH": REPO}
        self.env.pop("NOTIFY_SOCKET", None)     # only where a test asks for one
        self.env.update(env or {})
        self.process = None
        self.python = sys.executable    # the interpreter the daemon runs under
        self.context = zmq.Context()
        self.seen_pids = set()

    # -- lifecycle -----------------------------------------------------------------
    def start(self, wait=True):
        self._log = open(self.log_path, "ab")
        argv = [self.python, "-m", "backend_mgmt", "serve", "--config", self.config_path]
        if self.preamble:
            argv[1:3] = ["-c", self.preamble + "\nimport sys\nfrom backend_mgmt.cli import main"
                               "\nsys.exit(main(sys.argv[1:]))"]
        nofile = self.nofile
        self.process = subprocess.Popen(
            argv, env=self.env, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=(lambda: resource.setrlimit(resource.RLIMIT_NOFILE, nofile))
            if nofile else None)
        if wait:
            wait_until(self._answers, 10, 0.02, "the daemon to answer status")
        return self

    def _answers(self):
        if self.process.poll() is not None:
            raise AssertionError(f"daemon exited with {self.process.returncode}:\n{self.log()}")
        try:
            return self.request("status", timeout=0.5)["success"]
        except TimeoutError:
            return False

    def log(self):
        with open(self.log_path, errors="replace") as stream:
            return stream.read()

    def terminate(self, timeout=15):
        """SIGTERM and wait; the exit code."""
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def close(self):
        """Kill whatever is left (the daemon, any backend it started), remove files."""
        if self.process is not None and self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait(5)
        for pid in self.seen_pids:
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if getattr(self, "_log", None):
            self._log.close()
        self.context.destroy(linger=0)
        if self.owns_directory:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()

    # -- control protocol --------------------------------------------------------
    def socket(self, kind=zmq.DEALER, endpoint=None):
        sock = self.context.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(endpoint or self.control_endpoint)
        return sock

    def send_raw(self, frames, timeout=5.0, kind=zmq.DEALER):
        """Send raw frames on a fresh socket; the reply frames (TimeoutError if none)."""
        sock = self.socket(kind)
        try:
            sock.send_multipart(frames)
            if not sock.poll(int(timeout * 1000)):
                raise TimeoutError("no reply")
            return sock.recv_multipart()
        finally:
            sock.close(linger=0)

    def request(self, command, params=None, timeout=10.0):
        correlation_id = str(uuid.uuid4())
        frames = self.send_raw([wire.encode_control_request(command, params, correlation_id)],
                               timeout=timeout)
        assert len(frames) == 1, frames
        reply = json.loads(frames[0])
        assert reply["correlation_id"] == correlation_id, reply
        if command == "status" and reply["success"]:
            for model in reply["data"]["models"]:
                if model.get("pid"):
                    self.seen_pids.add(model["pid"])
        return reply

    def load(self, name, timeout=20.0):
        reply = self.request("load-model", {"model_name": name}, timeout=timeout)
        if reply["success"]:
            self.seen_pids.add(reply["data"]["model"]["pid"])
        return reply

    def reconfigure(self, change):
        """Edit the config file with ``change(document)``, then reload-config (must succeed)."""
        with open(self.config_path) as stream:
            document = yaml.safe_load(stream)
        change(document)
        with open(self.config_path, "w") as stream:
            yaml.safe_dump(document, stream)
        reply = self.request("reload-config", timeout=30)
        assert reply["success"], reply
        return reply

    def model(self, name):
        for model in self.request("status")["data"]["models"]:
            if model["name"] == name:
                return model
        return None

    # -- handshake -----------------------------------------------------------------
    def handshake(self, requested_model="", timeout=5.0, endpoint=None):
        sock = self.socket(zmq.DEALER, endpoint or self.handshake_endpoint)
        try:
            sock.send(Request(requested_model=requested_model).SerializeToString())
            if not sock.poll(int(timeout * 1000)):
                raise TimeoutError("no handshake reply")
            return Response.FromString(sock.recv())
        finally:
            sock.close(linger=0)

    def backend_pids(self):
        """Live processes started by this daemon (its descendants)."""
        try:
            return [p.pid for p in psutil.Process(self.process.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            return []


def ping_backend(context, endpoint, message="hello", correlation_id=7, timeout=5.0):
    """Handshake with a backend, then one ping; the Pong."""
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    try:
        sock.send(Request().SerializeToString())
        assert sock.poll(int(timeout * 1000)), "backend did not answer the handshake"
        response = Response.FromString(sock.recv())
        index = list(response.protocols).index("ping")
        sock.send_multipart([bytes([index]),
                             Ping(correlation_id=correlation_id, message=message)
                             .SerializeToString()])
        assert sock.poll(int(timeout * 1000)), "backend did not answer the ping"
        frames = sock.recv_multipart()
        assert frames[0] == bytes([index])
        return Pong.FromString(frames[1])
    finally:
        sock.close(linger=0)


def pid_alive(pid):
    try:
        process = psutil.Process(pid)
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def subscribe_events(daemon, warm_up_model, timeout=10.0):
    """A SUB socket on the daemon's event stream that is known to receive events.

    A new subscription reaches the PUB socket a moment after connect, and events published
    before that are lost ("slow joiner"). So: load ``warm_up_model`` (one that fails at
    start, so each load makes events) until an event arrives, then unload it and drain.
    """
    sub = daemon.context.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(f"ipc://{daemon.runtime_dir}/events.sock")
    deadline = time.monotonic() + timeout
    while not sub.poll(0):
        if time.monotonic() > deadline:
            sub.close(linger=0)
            raise AssertionError(f"no event within {timeout} s of subscribing")
        assert not daemon.load(warm_up_model)["success"], "the warm-up model must fail"
    daemon.request("unload-model", {"model_name": warm_up_model})
    while sub.poll(200):                     # the warm-up model's events, up to unloaded
        event = json.loads(sub.recv())
        if event["model"] == warm_up_model and event["state"] == "unloaded":
            break
    return sub


def next_events(sub, count, timeout=10.0, model=None):
    """The next ``count`` events (of ``model`` only, if given); fails after ``timeout``."""
    events = []
    deadline = time.monotonic() + timeout
    while len(events) < count:
        left = deadline - time.monotonic()
        if left <= 0 or not sub.poll(int(left * 1000)):
            raise AssertionError(f"got {len(events)} of {count} events: {events}")
        event = json.loads(sub.recv())
        if model is None or event["model"] == model:
            events.append(event)
    return events
