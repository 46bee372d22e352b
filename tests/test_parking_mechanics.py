"""How a backend is parked and woken (parking.py): the sleep protocol against real reference
backends and hostile ones, and the command form with a stand-in for cuda-checkpoint. A real
EventLoop runs every step; every wait is bounded."""

import json
import os
import signal
import sys
from types import SimpleNamespace

import pytest
import zmq

from backend_mgmt import park_settings
from backend_mgmt.loop import EventLoop
from backend_mgmt.messages import Response, Sleep, SleepState
from backend_mgmt.park_settings import ParkSettings
from backend_mgmt.parking import CommandParker, ProtocolParker, parker_for
from harness import REPO, pid_alive, ping_backend, wait_until

FAKE_CUDA_CHECKPOINT = os.path.join(REPO, "tests", "fixtures", "fake_cuda_checkpoint.py")
SLEEP_INDEX = 1           # the reference backend lists ["ping", "sleep"]


@pytest.fixture
def loop(caplog):
    loop = EventLoop()
    yield loop
    loop.close()
    # Whatever a backend sent, nothing may escape a callback (the loop would only log it).
    assert "unhandled error in event callback" not in caplog.text


@pytest.fixture
def context():
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


def run_step(loop, start, timeout=10.0, settle=0.2):
    """Start a step (``start(done)``) and run the loop until it is done, then ``settle``
    seconds more to see that ``done`` comes exactly once; the arguments ``done`` got."""
    calls = []
    within_call = []

    def done(*args):
        calls.append(args)
        loop.call_later(settle, loop.stop)

    guard = loop.call_later(timeout, loop.stop)
    start(done)
    within_call.extend(calls)
    loop.run()
    guard.cancel()
    assert not within_call, "done was called from inside the call that started the step"
    assert len(calls) == 1, f"done called {len(calls)} times: {calls}"
    return calls[0] if len(calls[0]) > 1 else calls[0][0]


def run_for(loop, seconds):
    loop.call_later(seconds, loop.stop)
    loop.run()


def protocol_parker(loop, context, endpoint, timeout=5.0):
    return ProtocolParker(loop, context, endpoint, "org/model", SLEEP_INDEX, timeout)


# -- the protocol form, against the reference backend ----------------------------------------

def test_park_state_and_wake_round_trip(loop, context, reference_backend):
    _, endpoint = reference_backend()
    parker = protocol_parker(loop, context, endpoint)
    assert run_step(loop, parker.ask_state) == (False, None)
    assert run_step(loop, parker.park) is None
    assert run_step(loop, parker.ask_state) == (True, None)
    assert ping_backend(context, endpoint, "parked?").message == "parked?"
    assert run_step(loop, parker.wake) is None
    assert run_step(loop, parker.ask_state) == (False, None)


def test_a_wake_slower_than_the_timeout_fails(loop, context, reference_backend):
    _, endpoint = reference_backend("--wake-delay", "3")
    parker = protocol_parker(loop, context, endpoint, timeout=0.5)
    assert run_step(loop, parker.park) is None
    started = loop.clock()
    assert run_step(loop, parker.wake, settle=0) == "WAKE: no answer within 0.5 s"
    assert loop.clock() - started < 2.0


def test_a_failing_sleep_is_a_failure_with_the_backends_message(loop, context,
                                                                 reference_backend):
    _, endpoint = reference_backend("--sleep-fail")
    parker = protocol_parker(loop, context, endpoint)
    reason = run_step(loop, parker.park)
    assert reason.startswith("SLEEP failed: ") and "--sleep-fail" in reason
    assert run_step(loop, parker.ask_state) == (False, None)


def test_a_cancelled_step_never_calls_done(loop, context, reference_backend):
    _, endpoint = reference_backend("--sleep-delay", "0.3")
    parker = protocol_parker(loop, context, endpoint)
    calls = []
    parker.park(calls.append)
    parker.cancel()
    run_for(loop, 0.8)
    assert calls == []


def test_a_backend_serving_another_model_refuses_the_handshake(loop, context,
                                                               reference_backend):
    _, endpoint = reference_backend(model="org/other")
    reason = run_step(loop, protocol_parker(loop, context, endpoint).park)
    assert "refused the handshake" in reason and "serves org/other" in reason


# -- the protocol form, against a hostile backend ---------------------------------------------

def state(correlation_id, asleep=True, error_message=""):
    return SleepState(correlation_id=correlation_id, asleep=asleep,
                      error_message=error_message).SerializeToString()


HANDSHAKE = Response(protocols=["ping", "sleep"]).SerializeToString()
INDEX = bytes([SLEEP_INDEX])

# name -> (its handshake answer, its answers to a Sleep with ``correlation_id``, what
# the step's done gets, in part)
HOSTILE = {
    "garbage handshake": ([b"\xff\xff\xff"], lambda cid: [], "not a Response"),
    "sleep not at the index": ([Response(protocols=["sleep"]).SerializeToString()],
                               lambda cid: [], "no longer advertises 'sleep' at index 1"),
    "garbage answer": ([HANDSHAKE], lambda cid: [[INDEX, b"\xff\xff\xff"]], "not a SleepState"),
    "three frames": ([HANDSHAKE], lambda cid: [[INDEX, state(cid), b""]], "not a SleepState"),
    "another index": ([HANDSHAKE], lambda cid: [[b"\0", state(cid)]], "not a SleepState"),
    "wrong correlation id": ([HANDSHAKE], lambda cid: [[INDEX, state(cid + 1)]],
                             "no answer within 0.5 s"),
    "a flood of wrong ids": ([HANDSHAKE], lambda cid: [[INDEX, state(cid + 1)]] * 500,
                             "more than 100 answers to other requests"),
    "oversize": ([HANDSHAKE], lambda cid: [[INDEX, state(cid) + b"\0" * (2 << 20)]],
                 "no answer within 0.5 s"),
    "awake after sleep": ([HANDSHAKE], lambda cid: [[INDEX, state(cid, asleep=False)]],
                          "answered that it is awake"),
    "error message": ([HANDSHAKE], lambda cid: [[INDEX, state(cid, error_message="\x1b[2J" +
                                                                 "x" * 5000)]],
                      "SLEEP failed: ?[2Jxxx"),
    "wrong ids, then the answer": ([HANDSHAKE], lambda cid: [[INDEX, state(cid - 1)]] * 5 +
                                   [[INDEX, state(cid)]], None),
}


@pytest.fixture
def hostile_backend(loop, context, workdir):
    """A ROUTER on the test's own loop answering as ``answers`` says; its endpoint."""
    sock = context.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    endpoint = f"ipc://{workdir}/hostile.sock"
    sock.bind(endpoint)

    def serve(handshake_answer, sleep_answers):
        def readable():
            while sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                identity, *body = sock.recv_multipart()
                if len(body) == 1:
                    sock.send_multipart([identity, *handshake_answer])
                    continue
                request = Sleep.FromString(body[1])
                for answer in sleep_answers(request.correlation_id):
                    sock.send_multipart([identity, *answer])
        loop.add_reader(sock, readable)
        return endpoint
    yield serve
    loop.close_socket(sock)


@pytest.mark.parametrize("behaviour", HOSTILE)
def test_a_hostile_backend_fails_the_step_and_raises_nothing(loop, context, hostile_backend,
                                                             behaviour):
    handshake_answer, sleep_answers, expected = HOSTILE[behaviour]
    endpoint = hostile_backend(handshake_answer, sleep_answers)
    reason = run_step(loop, protocol_parker(loop, context, endpoint, timeout=0.5).park)
    if expected is None:
        assert reason is None
    else:
        assert expected in reason
        assert len(reason) < 300


# -- choosing the parker ------------------------------------------------------------------------

def backend_with(park, protocols=("ping", "sleep"), pid=4242, unit=None,
                 endpoint="ipc://backend.sock"):
    return SimpleNamespace(spec=SimpleNamespace(fullname="org/model", park=park),
                           protocols=list(protocols), endpoint=endpoint,
                           running=SimpleNamespace(pid=pid, unit=unit))


def test_parker_for_follows_the_settings_and_the_advertised_protocols(loop, context):
    by_protocol = ParkSettings(method=park_settings.PROTOCOL, timeout=7.0)
    parker = parker_for(loop, context, backend_with(by_protocol, ("x", "ping", "sleep")))
    assert isinstance(parker, ProtocolParker)
    assert (parker.sleep_index, parker.timeout, parker.requested_model) == (2, 7.0, "org/model")
    assert parker_for(loop, context, backend_with(by_protocol, ("ping",))) is None
    assert parker_for(loop, context, backend_with(None)) is None
    without_park = SimpleNamespace(spec=SimpleNamespace(fullname="m"), protocols=["sleep"])
    assert parker_for(loop, context, without_park) is None    # a ModelSpec before `park`
    by_command = ParkSettings(method=park_settings.COMMAND, park_command=("true",),
                              wake_command=("true",))
    assert isinstance(parker_for(loop, context, backend_with(by_command, ())), CommandParker)


# -- the command form, with a stand-in for cuda-checkpoint -------------------------------------

def fake_command(record, *options):
    return (sys.executable, FAKE_CUDA_CHECKPOINT, "--record", record, *options)


def recorded(record):
    if not os.path.exists(record):
        return []
    with open(record) as stream:
        return [json.loads(line) for line in stream]


def command_settings(record, park_options=(), wake_options=(), timeout=10.0):
    return ParkSettings(
        method=park_settings.COMMAND, timeout=timeout,
        park_command=fake_command(record, *park_options, "--toggle", "--pid", "{pid}"),
        wake_command=fake_command(record, *wake_options, "--toggle", "--pid", "{pid}",
                                  "--at", "{endpoint}", "--unit={unit}", '--json={"pid": {pid}}'))


def test_commands_run_with_the_placeholders_substituted(loop, workdir):
    record = os.path.join(workdir, "calls")
    backend = backend_with(None, unit="backend-mgmt-m-1.service",
                           endpoint="ipc://run/{unit}/b.sock")
    parker = CommandParker(loop, backend, command_settings(record))
    assert run_step(loop, parker.park) is None
    assert run_step(loop, parker.wake) is None
    assert [call["argv"] for call in recorded(record)] == [
        ["--toggle", "--pid", "4242"],
        # a value is never searched for placeholders itself
        ["--toggle", "--pid", "4242", "--at", "ipc://run/{unit}/b.sock",
         "--unit=backend-mgmt-m-1.service", '--json={"pid": 4242}']]   # other braces stay


def test_a_failing_command_reports_its_status_and_last_stderr_line(loop, workdir):
    record = os.path.join(workdir, "calls")
    parker = CommandParker(loop, backend_with(None), command_settings(record, ["--fail"]))
    reason = run_step(loop, parker.park)
    assert reason == (f"park: {sys.executable} exited with status 1: "
                      "fake-cuda-checkpoint: toggle failed as asked")


def test_a_hanging_command_is_killed_at_its_timeout(loop, workdir):
    record = os.path.join(workdir, "calls")
    parker = CommandParker(loop, backend_with(None),
                           command_settings(record, ["--hang"], timeout=0.5))
    started = loop.clock()
    try:
        reason = run_step(loop, parker.park)
        assert "did not finish within its timeout; killed" in reason
        assert loop.clock() - started < 5.0
        [call] = recorded(record)
        wait_until(lambda: not pid_alive(call["pid"]), 5, message="the command gone")
    finally:
        for call in recorded(record):      # should the test fail, leave no command hanging
            if pid_alive(call["pid"]):
                os.kill(call["pid"], signal.SIGKILL)


@pytest.mark.parametrize("argument", ["{pid.__class__}", "{pid!r}", "{0}", "{}", "{PID}",
                                      "{endpoint.__init__.__globals__}"])
def test_an_unknown_placeholder_is_refused_and_nothing_runs(loop, workdir, argument):
    assert park_settings.template_problems(["cuda-checkpoint", argument])
    record = os.path.join(workdir, "calls")
    settings = ParkSettings(method=park_settings.COMMAND,
                            park_command=fake_command(record, argument))
    reason = run_step(loop, CommandParker(loop, backend_with(None), settings).park)
    assert reason.startswith("cannot park: ") and "unknown placeholder" in reason
    assert recorded(record) == []


def test_unit_without_a_unit_fails_rather_than_run_with_an_empty_argument(loop, workdir):
    record = os.path.join(workdir, "calls")
    parker = CommandParker(loop, backend_with(None, unit=None), command_settings(record))
    assert run_step(loop, parker.park) is None          # {pid} only: fine without a unit
    reason = run_step(loop, parker.wake)
    assert reason == "cannot wake: {unit} has no value for this backend"
    assert len(recorded(record)) == 1


def test_template_problems():
    assert park_settings.template_problems(["cuda-checkpoint", "--toggle", "--pid", "{pid}"]) == []
    assert park_settings.template_problems(["x", "{endpoint}", "--unit={unit}", "{", "}{"]) == []
    assert park_settings.template_problems([]) == ["the command is empty"]
    [problem] = park_settings.template_problems(["x", "--pid={pid}{pids}"])
    assert "argument 1" in problem and "{pids}" in problem
    assert park_settings.template_problems(["x", 3]) == ["argument 1 is not a string"]


def test_a_cancelled_command_step_is_killed_and_never_calls_done(loop, workdir):
    """Its backend is being stopped (or is gone): the command is not left running to its
    timeout."""
    record = os.path.join(workdir, "calls")
    parker = CommandParker(loop, backend_with(None),
                           command_settings(record, ["--hang"], timeout=60.0))
    calls = []
    parker.park(calls.append)
    try:
        wait_until(lambda: recorded(record), 5, message="the command to run")
        [call] = recorded(record)
        parker.cancel()
        run_for(loop, 0.5)                   # the loop reaps it
        assert not pid_alive(call["pid"]), "the cancelled command still runs"
        assert calls == []
    finally:
        for call in recorded(record):
            if pid_alive(call["pid"]):
                os.kill(call["pid"], signal.SIGKILL)

