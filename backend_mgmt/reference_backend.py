"""A small real backend that keeps the backend contract (README.md, "Backend contract"),
for tests and demos.

    python3 -m backend_mgmt.reference_backend --ipc-endpoint EP --model-name NAME [options]

It binds a ROUTER socket at EP. The first message from each client identity is a handshake
Request, answered with a Response listing its protocols (["ping", "sleep"]). After that a client
sends [protocol index byte, payload]; for index 0 (ping) the payload is a Ping and the answer a
Pong with the same fields; for index 1 (sleep) a Sleep, answered by a SleepState once it has
"parked" or "woken" (it answers pings meanwhile, and while asleep). SIGTERM stops it cleanly.

Options to behave like real backends do: take time to load (--startup-delay), fail at start
(--fail-at-start CODE), crash later (--exit-after S), never answer (--no-handshake), ignore
SIGTERM (--ignore-sigterm), hold memory (--hold-memory MB), print odd output (--say TEXT),
start a helper process of its own (--spawn-helper), leave a worker behind that is slow to stop
(--stubborn-worker S), fail to start again once it has crashed (--fail-if-exists FILE, with
--crash-once FILE), speak no ping (--no-ping), take time to sleep or wake
(--sleep-delay S, --wake-delay S), fail to (--sleep-fail, --wake-fail), not offer sleep
(--no-sleep). For tests, --report FILE writes what it was
given (its --model-name, --ipc-endpoint, BACKEND_MGMT_* environment) and how many handshakes
and pings it answered, as JSON.
"""

import argparse
import heapq
import itertools
import json
import logging
import os
import signal
import subprocess
import sys
import time

import zmq

from .notify import Notifier
from .messages import (PING_PROTOCOL, SLEEP_PROTOCOL, Ping, Pong, Request, Response, Sleep,
                       SleepState)

PROTOCOLS = [PING_PROTOCOL, SLEEP_PROTOCOL]     # ping stays at index 0


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="backend_mgmt.reference_backend",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--ipc-endpoint", default=os.environ.get("BACKEND_MGMT_ENDPOINT"),
                        help="ZeroMQ endpoint to bind (default: $BACKEND_MGMT_ENDPOINT)")
    parser.add_argument("--model-name", default=os.environ.get("BACKEND_MGMT_MODEL_NAME", ""),
                        help="the model's full name; handshakes naming another are refused")
    parser.add_argument("--startup-delay", type=float, default=0.0, metavar="S",
                        help="seconds to 'load the model' before binding")
    parser.add_argument("--fail-at-start", type=int, metavar="CODE",
                        help="exit with CODE after the startup delay instead of serving")
    parser.add_argument("--exit-after", type=float, metavar="S",
                        help="exit with code 3 S seconds after becoming ready (a crash)")
    parser.add_argument("--exit-code", type=int, default=3, metavar="CODE",
                        help="the code --exit-after exits with (default 3)")
    parser.add_argument("--crash-once", metavar="FILE",
                        help="with --exit-after: crash only if FILE does not exist yet (and "
                             "create it), so a restarted backend keeps running")
    parser.add_argument("--no-handshake", action="store_true",
                        help="bind but never answer handshakes (a hung load)")
    parser.add_argument("--ignore-sigterm", action="store_true",
                        help="ignore SIGTERM, so only SIGKILL stops it")
    parser.add_argument("--progress", type=float, metavar="S",
                        help="while 'loading', report progress every S seconds to "
                             "$NOTIFY_SOCKET, extending the start-up deadline by 2 x S")
    parser.add_argument("--say", metavar="TEXT", action="append", default=[],
                        help="write TEXT to stdout at start, with Python backslash escapes "
                             "(\\u2028, \\r, \\x1b, \\x00) decoded; a backend's odd output")
    parser.add_argument("--spawn-helper", action="store_true",
                        help="start a helper process of its own (sleeps 10 minutes, in the "
                             "backend's process group) and print 'helper pid N'")
    parser.add_argument("--hold-memory", type=int, default=0, metavar="MB",
                        help="allocate and touch this much memory (a model's weights)")
    parser.add_argument("--stubborn-worker", type=float, metavar="S",
                        help="start a worker process that outlives a SIGTERM by S seconds "
                             "(as an engine's worker slow to shut down)")
    parser.add_argument("--fail-if-exists", metavar="FILE",
                        help="exit with code 4 at start if FILE exists (with --crash-once FILE: "
                             "every restart after the crash fails to start)")
    parser.add_argument("--no-ping", action="store_true",
                        help="list no protocols in the handshake answer (no ping)")
    parser.add_argument("--no-sleep", action="store_true",
                        help="do not offer the sleep protocol (list only ping)")
    parser.add_argument("--sleep-delay", type=float, default=0.0, metavar="S",
                        help="answer a SLEEP S seconds after it came (other messages are "
                             "answered meanwhile)")
    parser.add_argument("--wake-delay", type=float, default=0.0, metavar="S",
                        help="answer a WAKE S seconds after it came")
    parser.add_argument("--sleep-fail", action="store_true",
                        help="answer a SLEEP with an error_message (and stay awake)")
    parser.add_argument("--wake-fail", action="store_true",
                        help="answer a WAKE with an error_message (and stay asleep)")
    parser.add_argument("--report", metavar="FILE",
                        help="write what this backend was given (arguments and BACKEND_MGMT_* "
                             "environment) and the handshakes and pings it answered to FILE "
                             "as JSON, at start and after each answer")
    args = parser.parse_args(argv)
    if not args.ipc_endpoint:
        parser.error("--ipc-endpoint is required")
    return args


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                        format="%(levelname)s reference-backend: %(message)s")
    log = logging.getLogger()
    if args.stubborn_worker is not None:
        start_stubborn_worker(args.stubborn_worker, log)
    if args.ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        signal.signal(signal.SIGTERM, _raise_stop)
    try:
        return serve(args, log)
    except Stop:
        log.info("stopped by SIGTERM")
        return 0


def start_stubborn_worker(linger, log):
    """Fork a worker that, on SIGTERM, takes ``linger`` seconds to exit (before any ZeroMQ
    context exists, so the fork is safe)."""
    pid = os.fork()
    if pid:
        log.info("worker pid %d started (exits %g s after a SIGTERM)", pid, linger)
        return
    terminated = []
    signal.signal(signal.SIGTERM, lambda *_: terminated.append(time.monotonic()))
    parent = os.getppid()
    while not terminated or time.monotonic() - terminated[0] < linger:
        if not terminated and os.getppid() != parent:
            break                   # the backend is gone without a SIGTERM reaching us
        time.sleep(0.1)
    os._exit(0)


class Stop(Exception):
    """Raised by the SIGTERM handler to leave whatever the backend is blocked in."""


def _raise_stop(signum, frame):
    raise Stop()


def serve(args, log):
    devices = os.environ.get("CUDA_VISIBLE_DEVICES")
    log.info("starting model %s (pid %d, %s)", args.model_name, os.getpid(),
             "CUDA_VISIBLE_DEVICES not set" if devices is None
             else f"CUDA_VISIBLE_DEVICES={devices}")
    if args.spawn_helper:
        helper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"],
                                  stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        log.info("helper pid %d", helper.pid)
    for text in args.say:
        sys.stdout.write(text.encode("ascii", "backslashreplace").decode("unicode_escape"))
        sys.stdout.flush()
    counts = {"handshakes": 0, "pings": 0, "sleeps": 0, "wakes": 0}
    if args.report:
        write_report(args.report, args, counts)
    if args.fail_if_exists and os.path.exists(args.fail_if_exists):
        log.error("failing at start: %s exists (exit code 4)", args.fail_if_exists)
        return 4
    weights = bytearray(args.hold_memory * 1024 * 1024)
    weights[::4096] = b"\1" * len(range(0, len(weights), 4096))   # touch every page
    if args.startup_delay:
        load_model(args.startup_delay, args.progress)
    if args.fail_at_start is not None:
        log.error("failing at start as asked (exit code %d)", args.fail_at_start)
        return args.fail_at_start

    context = zmq.Context()
    sock = context.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, 1024 * 1024)
    sock.bind(args.ipc_endpoint)
    log.info("listening on %s", args.ipc_endpoint)
    exit_at = time.monotonic() + args.exit_after if args.exit_after is not None else None
    if exit_at is not None and args.crash_once:
        if os.path.exists(args.crash_once):
            exit_at = None
        else:
            open(args.crash_once, "w").close()
    protocols = offered_protocols(args)
    sleeper = Sleeper(args, counts)
    later = Later()
    greeted = set()
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    try:
        while True:
            for identity, answer in later.due():
                sock.send_multipart([identity, *answer()])
                if args.report:
                    write_report(args.report, args, counts)
            timeout = later.wait_ms()
            if exit_at is not None:
                until_exit = max(0, int((exit_at - time.monotonic()) * 1000))
                if until_exit == 0:
                    log.error("crashing as asked (--exit-after)")
                    return args.exit_code
                timeout = until_exit if timeout is None else min(timeout, until_exit)
            try:
                events = dict(poller.poll(timeout))
            except zmq.ZMQError:
                continue
            if sock not in events:
                continue
            frames = sock.recv_multipart()
            identity, body = frames[0], frames[1:]
            if identity not in greeted:
                if args.no_handshake:
                    continue
                sock.send_multipart([identity, handshake_answer(body, args.model_name, protocols)])
                greeted.add(identity)
                counts["handshakes"] += 1
            else:
                delayed = serve_protocol(body, protocols, sleeper, counts)
                if delayed is None:
                    continue
                later.add(*delayed, identity)
                continue                     # sent from the loop's top, when due
            if args.report:
                write_report(args.report, args, counts)
    finally:
        sock.close(linger=0)
        context.term()
        del weights


def write_report(path, args, counts):
    """What the daemon gave this backend, written atomically (a reader never sees half)."""
    report = {"model_name": args.model_name, "ipc_endpoint": args.ipc_endpoint,
              "pid": os.getpid(), **counts,
              "env": {k: v for k, v in os.environ.items() if k.startswith("BACKEND_MGMT_")}}
    with open(path + ".tmp", "w") as stream:
        json.dump(report, stream)
    os.replace(path + ".tmp", path)


def load_model(seconds, progress_every):
    """'Load the model' for ``seconds``, reporting progress as a real slow loader would."""
    if not progress_every:
        time.sleep(seconds)
        return
    notifier = Notifier.from_environment(dict(os.environ))
    started = time.monotonic()
    while (elapsed := time.monotonic() - started) < seconds:
        notifier.send(f"EXTEND_TIMEOUT_USEC={int(progress_every * 2e6)}",
                      f"STATUS=loading {100 * elapsed / seconds:.0f}%")
        time.sleep(min(progress_every, seconds - elapsed))
    notifier.close()


def handshake_answer(body, model_name, protocols=PROTOCOLS):
    try:
        request = Request.FromString(body[-1] if body else b"")
    except Exception:
        return Response(error_message="handshake is not a valid Request").SerializeToString()
    wanted = request.requested_model
    if wanted and model_name and wanted != model_name:
        return Response(error_message=f"this backend serves {model_name}, not {wanted}"
                        ).SerializeToString()
    return Response(protocols=protocols).SerializeToString()


def offered_protocols(args):
    if args.no_ping:
        return []
    return [PING_PROTOCOL] if args.no_sleep else list(PROTOCOLS)


def serve_protocol(body, protocols, sleeper, counts):
    """Take one [protocol index byte, payload] message: ``(delay, answer)``, where
    ``answer()`` makes the answer's frames once ``delay`` seconds have passed; None if the
    message is not understood."""
    if len(body) != 2 or len(body[0]) != 1 or body[0][0] >= len(protocols):
        return None
    protocol = protocols[body[0][0]]
    if protocol == PING_PROTOCOL:
        try:
            ping = Ping.FromString(body[1])
        except Exception:
            return None
        counts["pings"] += 1
        pong = Pong(correlation_id=ping.correlation_id, message=ping.message)
        return 0.0, lambda: [body[0], pong.SerializeToString()]
    if protocol == SLEEP_PROTOCOL:
        try:
            request = Sleep.FromString(body[1])
        except Exception:
            return None
        delay, state = sleeper.take(request)
        return delay, lambda: [body[0], state().SerializeToString()]
    return None


class Sleeper:
    """The sleep protocol's side of the backend: asleep or awake. A SLEEP or WAKE takes effect
    when it is answered, after its delay (a real engine releases or restores its GPU memory
    meanwhile); STATE is answered at once."""

    def __init__(self, args, counts):
        self.args = args
        self.counts = counts
        self.asleep = False

    def take(self, request):
        """``(delay, state)``: ``state()`` applies the request and makes its SleepState."""
        if request.action == Sleep.SLEEP:
            return self.args.sleep_delay, lambda: self._turn(request, True, self.args.sleep_fail)
        if request.action == Sleep.WAKE:
            return self.args.wake_delay, lambda: self._turn(request, False, self.args.wake_fail)
        if request.action == Sleep.STATE:
            return 0.0, lambda: SleepState(correlation_id=request.correlation_id,
                                           asleep=self.asleep)
        return 0.0, lambda: SleepState(correlation_id=request.correlation_id, asleep=self.asleep,
                                       error_message=f"unknown action {request.action}")

    def _turn(self, request, asleep, fail):
        step = "sleep" if asleep else "wake"
        if fail:
            return SleepState(correlation_id=request.correlation_id, asleep=self.asleep,
                              error_message=f"{step} failed as asked (--{step}-fail)")
        self.asleep = asleep
        self.counts["sleeps" if asleep else "wakes"] += 1
        return SleepState(correlation_id=request.correlation_id, asleep=asleep)


class Later:
    """Answers waiting for their time, in the order they are due."""

    def __init__(self):
        self._heap = []
        self._order = itertools.count()

    def add(self, delay, answer, identity):
        heapq.heappush(self._heap, (time.monotonic() + delay, next(self._order), identity, answer))

    def due(self):
        """(identity, answer) of every answer due now."""
        while self._heap and self._heap[0][0] <= time.monotonic():
            _, _, identity, answer = heapq.heappop(self._heap)
            yield identity, answer

    def wait_ms(self):
        """Milliseconds until the next answer is due (None: none waits)."""
        if not self._heap:
            return None
        return max(0, int((self._heap[0][0] - time.monotonic()) * 1000) + 1)


if __name__ == "__main__":
    sys.exit(main())
