"""The manager's decisions, in-process: a fake clock, a fake launcher, a fake probe (fakes.py).

Every edge of states.py's table is taken by one scenario below, through what the manager is
asked or told (load, unload, a probe's answer, an exit, a timer), never by setting a state;
the expected outcomes are README's ("Restarts, liveness, reloads", "Errors", "Adoption").
Nothing sleeps: time moves when a test advances the fake loop.
"""

import dataclasses
import types

import pytest

from backend_mgmt import errors, states
from backend_mgmt.config import Liveness
from backend_mgmt.errors import ServiceError
from backend_mgmt.launchers.base import ExitInfo
from backend_mgmt.launchers.records import Adoption
from backend_mgmt.manager import PARKED_FILE, endpoint_for, extend_seconds
from backend_mgmt.park_settings import ParkSettings
from fakes import WALL_START, Core, FakeRunning

CRASH = ExitInfo(code=1)
CLEAN = ExitInfo(code=0)


@pytest.fixture
def make(tmp_path):
    def make_core(models=None, **settings):
        return Core(models or {"m": {}}, tmp_path, **settings)
    return make_core


@pytest.fixture
def core(make):
    return make({"m": {"startup_timeout": 30, "stop_timeout": 7,
                       "restart": {"backoff_initial": 1, "backoff_max": 4,
                                   "max_restarts": 3, "window": 100}}})


class Taken:
    """Records every edge the registry takes, as (old phase, new phase)."""

    def __init__(self, core):
        self.edges = []
        transition = core.registry.transition

        def recording(backend, new, reason=""):
            old = backend.phase
            transition(backend, new, reason)
            self.edges.append((old, new))
        core.registry.transition = recording


def mload(core, name="m"):
    """load-model straight to the manager; its answers go to core.answers."""
    core.manager.load(name, lambda backend, error: core.answers.append((name, backend, error)))
    core.loop.advance(0)


def munload(core, name="m"):
    core.manager.unload(name, lambda backend: core.unloaded.append(backend.name))
    core.loop.advance(0)


def last_error(core):
    return core.answers[-1][2]


def ready(core, name="m"):
    mload(core, name)
    core.ready(name)


def crash_to_restarting(core):
    ready(core)
    core.exit("m", CRASH)


def to_restart_loading(core):
    crash_to_restarting(core)
    core.loop.advance(1)               # backoff_initial


def to_stalled(core):
    to_restart_loading(core)
    core.loop.advance(30)              # startup_timeout


def to_hung(core):
    core.manager.config.models["m"] = dataclasses.replace(
        core.manager.config.models["m"], liveness=Liveness(interval=1))
    ready(core)
    core.liveness.last.hang("missed 3 pings")


def to_failed_stopping(core):
    mload(core)
    core.loop.advance(30)


def adopt(core, alive=True, was_ready=False, stopping=False, **record):
    handle = None
    if alive:
        handle = FakeRunning(None, 4242, lambda line: None, None, unit="backend-m.service")
    fields = {"model": "m", "unit": "backend-m.service", "endpoint": "tcp://127.0.0.1:20000",
              "started_at": WALL_START - 50, "gpus": None, "stop_timeout": 7,
              "definition": None, "ready_at": None, "protocols": None}
    fields.update(record)
    core.manager.adopt([Adoption(types.SimpleNamespace(**fields), running=handle,
                                 ended=None if alive else ExitInfo(code=3),
                                 was_ready=was_ready, stopping=stopping)])
    return handle


def parkable(core):
    core.manager.config.models["m"] = dataclasses.replace(
        core.manager.config.models["m"], park=ParkSettings(method="protocol", timeout=5))


def to_parking(core):
    parkable(core)
    ready(core)
    core.manager.park_backend(core.get("m"), core.parks.append, "test")


def to_parked(core):
    to_parking(core)
    core.parkers.of("m").succeed()


def to_waking(core):
    to_parked(core)
    mload(core)


def adopt_parked(core):
    """A unit the previous daemon recorded as parked (PARKED_FILE), adopted."""
    parkable(core)
    (core.runtime_dir / PARKED_FILE).write_text(
        '{"m": {"pid": 4242, "unit": "backend-m.service", "protocols": ["sleep"]}}')
    return adopt(core)


# Each edge of the table and the steps that take it (the last step takes it).
SCENARIOS = {
    (None, states.LOADING): mload,
    (None, states.ADOPTING): adopt,
    (None, states.FAILED): lambda core: adopt(core, alive=False),
    (states.LOADING, states.READY): ready,
    (states.LOADING, states.FAILED): lambda core: (mload(core), core.exit("m", CRASH)),
    (states.LOADING, states.FAILED_STOPPING): to_failed_stopping,
    (states.LOADING, states.UNLOADING): lambda core: (mload(core), munload(core)),
    (states.ADOPTING, states.READY): lambda core: (adopt(core), core.ready("m")),
    (states.ADOPTING, states.FAILED): lambda core: adopt(core).exit(CRASH),
    (states.ADOPTING, states.FAILED_STOPPING): lambda core: (adopt(core),
                                                             core.loop.advance(30)),
    (states.ADOPTING, states.UNLOADING): lambda core: (adopt(core), munload(core)),
    (states.RESTART_LOADING, states.READY): lambda core: (to_restart_loading(core),
                                                          core.ready("m")),
    (states.RESTART_LOADING, states.RESTARTING): lambda core: (to_restart_loading(core),
                                                               core.exit("m", CRASH)),
    (states.RESTART_LOADING, states.FAILED): lambda core: (
        to_restart_loading(core), core.get("m").restart_times.extend([0.5, 0.6]),
        core.exit("m", CRASH)),
    (states.RESTART_LOADING, states.STOPPING_STALLED): to_stalled,
    (states.RESTART_LOADING, states.UNLOADING): lambda core: (to_restart_loading(core),
                                                              munload(core)),
    (states.STOPPING_STALLED, states.RESTARTING): lambda core: (to_stalled(core),
                                                                core.exit("m")),
    (states.STOPPING_STALLED, states.FAILED): lambda core: (
        to_stalled(core), core.get("m").restart_times.extend([0.5, 0.6]), core.exit("m")),
    (states.STOPPING_STALLED, states.UNLOADING): lambda core: (to_stalled(core),
                                                               munload(core)),
    (states.READY, states.STOPPING_HUNG): to_hung,
    (states.READY, states.RESTARTING): crash_to_restarting,
    (states.READY, states.FAILED): lambda core: (ready(core), core.exit("m", CLEAN)),
    (states.READY, states.UNLOADING): lambda core: (ready(core), munload(core)),
    (states.STOPPING_HUNG, states.RESTARTING): lambda core: (to_hung(core), core.exit("m")),
    (states.STOPPING_HUNG, states.FAILED): lambda core: (
        to_hung(core), core.get("m").restart_times.extend([0.5, 0.6, 0.7]), core.exit("m")),
    (states.STOPPING_HUNG, states.UNLOADING): lambda core: (to_hung(core), munload(core)),
    (states.RESTARTING, states.RESTART_LOADING): to_restart_loading,
    (states.RESTARTING, states.LOADING): lambda core: (crash_to_restarting(core), mload(core)),
    (states.RESTARTING, states.FAILED): lambda core: (
        crash_to_restarting(core), setattr(core.launcher, "refuse", "no such command"),
        core.loop.advance(1)),
    (states.RESTARTING, states.UNLOADED): lambda core: (crash_to_restarting(core),
                                                        munload(core)),
    (states.FAILED, states.LOADING): lambda core: (mload(core), core.exit("m", CRASH),
                                                   mload(core)),
    (states.FAILED, states.UNLOADED): lambda core: (mload(core), core.exit("m", CRASH),
                                                    munload(core)),
    (states.FAILED_STOPPING, states.FAILED): lambda core: (to_failed_stopping(core),
                                                           core.exit("m")),
    (states.FAILED_STOPPING, states.FAILED_STOPPING_THEN_LOAD): lambda core: (
        to_failed_stopping(core), mload(core)),
    (states.FAILED_STOPPING, states.FAILED_STOPPING_THEN_FORGET): lambda core: (
        to_failed_stopping(core), munload(core)),
    (states.FAILED_STOPPING_THEN_LOAD, states.LOADING): lambda core: (
        to_failed_stopping(core), mload(core), core.exit("m")),
    (states.FAILED_STOPPING_THEN_LOAD, states.FAILED_STOPPING_THEN_FORGET): lambda core: (
        to_failed_stopping(core), mload(core), munload(core)),
    (states.FAILED_STOPPING_THEN_FORGET, states.UNLOADED): lambda core: (
        to_failed_stopping(core), munload(core), core.exit("m")),
    (states.FAILED_STOPPING_THEN_FORGET, states.FAILED_STOPPING_THEN_LOAD): lambda core: (
        to_failed_stopping(core), munload(core), mload(core)),
    (states.UNLOADING, states.UNLOADED): lambda core: (ready(core), munload(core),
                                                       core.exit("m")),
    (states.READY, states.PARKING): to_parking,
    (states.PARKING, states.PARKED): to_parked,
    (states.PARKING, states.UNLOADING): lambda core: (to_parking(core),
                                                      core.parkers.of("m").fail()),
    (states.PARKING, states.UNLOADED): lambda core: (to_parking(core), core.exit("m", CRASH)),
    (states.PARKED, states.WAKING): to_waking,
    (states.PARKED, states.UNLOADING): lambda core: (to_parked(core), munload(core)),
    (states.PARKED, states.UNLOADED): lambda core: (to_parked(core), core.exit("m", CRASH)),
    (states.WAKING, states.READY): lambda core: (to_waking(core),
                                                 core.parkers.of("m").succeed()),
    (states.WAKING, states.STOPPING_STALLED): lambda core: (to_waking(core),
                                                            core.parkers.of("m").time_out()),
    (states.WAKING, states.RESTARTING): lambda core: (to_waking(core), core.exit("m", CRASH)),
    (states.WAKING, states.FAILED): lambda core: (to_waking(core), core.exit("m", CLEAN)),
    (states.WAKING, states.UNLOADING): lambda core: (to_waking(core), munload(core)),
    (states.ADOPTING, states.PARKED): adopt_parked,
}
TABLE = {(old, new) for old, news in states.ALLOWED.items() for new in news}


def test_every_edge_of_the_table_has_a_scenario():
    assert set(SCENARIOS) == TABLE


@pytest.mark.parametrize("edge", sorted(SCENARIOS, key=str), ids=str)
def test_each_edge_is_taken(core, edge):
    taken = Taken(core)
    SCENARIOS[edge](core)
    assert taken.edges[-1] == edge


# -- loading ---------------------------------------------------------------------------------
def test_load_starts_the_backend_and_answers_when_it_is_ready(core):
    mload(core)
    backend = core.get("m")
    assert backend.state == "loading" and core.answers == []
    launch = core.launcher.last.launch
    assert launch.argv == ("backend", "--ipc-endpoint", backend.endpoint, "--model-name", "m")
    assert launch.env["BACKEND_MGMT_MODEL"] == "m"
    assert launch.env["NOTIFY_SOCKET"] == "@progress"      # the constructor's notify_address
    assert launch.started_at == WALL_START
    core.loop.advance(2.5)
    core.ready("m", ["inference", "ping"])
    assert core.answers == [("m", backend, None)]
    assert backend.state == "ready" and backend.protocols == ["inference", "ping"]
    assert backend.reason == "answered the handshake after 2.500 s"
    assert backend.ready_at == WALL_START + 2.5
    assert backend.as_status()["endpoint"] == backend.endpoint
    assert core.events == [("m", None, "loading"), ("m", "loading", "ready")]
    assert core.loop.pending() == []                   # the startup timer is gone


def test_a_second_load_joins_and_a_ready_model_answers_at_once(core):
    mload(core)
    mload(core)
    assert len(core.launcher.started) == 1 and core.answers == []
    core.ready("m")
    assert len(core.answers) == 2
    mload(core)
    assert len(core.answers) == 3 and len(core.launcher.started) == 1


def test_unknown_model_is_refused(core):
    with pytest.raises(ServiceError) as caught:
        mload(core, "nope")
    assert caught.value.code == errors.UNKNOWN_MODEL


def test_exit_during_start_up_fails_the_load_with_its_output(core):
    mload(core)
    core.running("m").say("loading weights")
    core.running("m").say("CUDA error")
    core.exit("m", ExitInfo(code=3))
    error = last_error(core)
    assert error.code == errors.LOAD_FAILED
    assert error.message == ("model m backend exited with code 3 during start-up; last output: "
                             "CUDA error")
    assert error.data["output"] == ["loading weights", "CUDA error"]
    assert error.data["last_exit"]["code"] == 3
    backend = core.get("m")
    assert backend.state == "failed" and backend.error_code == errors.LOAD_FAILED
    assert backend.as_status()["output"] == ["loading weights", "CUDA error"]
    assert backend.last_exit_at == WALL_START
    assert core.manager.stats == {"loads": 1, "load_failures": 1, "restarts": 0, "exits": 1}


def test_a_launch_error_fails_the_load(core):
    core.launcher.refuse = "command not found"
    mload(core)
    assert last_error(core).code == errors.LOAD_FAILED
    assert last_error(core).message == "command not found"
    assert core.events == [("m", None, "loading"), ("m", "loading", "failed")]


def test_startup_timeout_fails_the_load_and_stops_the_process(core):
    mload(core)
    core.loop.advance(29.9)
    assert core.answers == []
    core.loop.advance(0.1)
    error = last_error(core)
    assert error.code == errors.STARTUP_TIMEOUT
    assert error.message.startswith("model m did not answer its handshake within 30 s; "
                                    "it printed nothing")
    assert core.running("m").stops == [7]                   # stop_timeout
    assert core.probes.last.cancelled
    backend = core.get("m")
    assert backend.state == "failed" and backend.phase == states.FAILED_STOPPING
    core.exit("m")
    assert backend.phase == states.FAILED and backend.error_code == errors.STARTUP_TIMEOUT
    assert core.events[-1] == ("m", "loading", "failed")    # the exit shows nothing new


def test_probe_error_fails_the_load(core):
    mload(core)
    core.probes.last.fail("wrong model answered")
    assert last_error(core).code == errors.LOAD_FAILED
    assert last_error(core).message == "wrong model answered"
    assert core.running("m").stops == [7]


def test_extend_timeout_moves_the_deadline_out_never_in(core):
    mload(core)
    pid = core.running("m").pid
    core.loop.advance(20)
    core.manager.on_progress(pid, {"EXTEND_TIMEOUT_USEC": "60000000", "STATUS": "50%"})
    assert core.get("m").progress == "50%"
    core.manager.on_progress(pid, {"EXTEND_TIMEOUT_USEC": "1000000"})      # would shorten
    core.manager.on_progress(pid, {"EXTEND_TIMEOUT_USEC": "-5"})            # not digits
    core.loop.advance(59.9)
    assert core.answers == []
    core.loop.advance(0.1)
    error = last_error(core)
    assert error.code == errors.STARTUP_TIMEOUT
    assert "(extended by the backend to 80 s)" in error.message


def test_extend_timeout_is_capped_a_day_after_the_start(core):
    mload(core)
    core.manager.on_progress(core.running("m").pid, {"EXTEND_TIMEOUT_USEC": "9" * 20})
    assert core.get("m").startup_deadline == 24 * 3600


def test_progress_from_a_stranger_is_ignored(core):
    mload(core)
    core.manager.on_progress(1, {"STATUS": "hello"})
    assert core.get("m").progress is None


# -- restarts --------------------------------------------------------------------------------
def test_a_crash_while_ready_restarts_after_a_doubling_backoff(core):
    ready(core)
    delays = []
    for _ in range(3):
        core.exit("m", CRASH)
        backend = core.get("m")
        assert backend.state == "restarting"
        delays.append(backend.next_restart_at - core.loop.wall_clock())
        before = len(core.launcher.started)
        core.loop.advance(delays[-1] - 0.01)
        assert len(core.launcher.started) == before          # not before the backoff
        core.loop.advance(0.01)
        assert len(core.launcher.started) == before + 1
        assert backend.phase == states.RESTART_LOADING and backend.state == "loading"
        assert backend.reason == "restarting"
        core.ready("m")
    assert delays == [1, 2, 4]                                 # backoff_initial doubling
    assert core.get("m").restarts == 3
    assert core.get("m").last_error.startswith("backend exited with code 1 while ready")


def test_backoff_stops_at_backoff_max(make):
    core = make({"m": {"restart": {"backoff_initial": 3, "backoff_max": 5,
                                   "max_restarts": 9}}})
    ready(core)
    core.exit("m", CRASH)
    core.loop.advance(3)
    core.ready("m")
    core.exit("m", CRASH)
    assert core.get("m").next_restart_at - core.loop.wall_clock() == 5


def test_flapping_gives_up_after_max_restarts_within_the_window(core):
    ready(core)
    for _ in range(3):
        core.exit("m", CRASH)
        core.loop.advance(4)
        core.ready("m")
    core.exit("m", CRASH)
    backend = core.get("m")
    assert backend.state == "failed" and backend.error_code == errors.FLAPPING
    assert "gave up after 3 restarts within 100 s (restart.max_restarts)" in backend.error


def test_restarts_outside_the_window_do_not_count(core):
    ready(core)
    for _ in range(6):
        core.exit("m", CRASH)
        core.loop.advance(1)                   # never more than backoff_initial: none recent
        core.ready("m")
        core.loop.advance(101)                 # each restart leaves the window before the next
    assert core.get("m").state == "ready" and core.get("m").restarts == 6


def test_a_clean_exit_is_not_restarted_under_on_failure(core):
    ready(core)
    core.exit("m", CLEAN)
    backend = core.get("m")
    assert backend.state == "failed"
    assert backend.error == "backend exited with code 0 while ready; it printed nothing"


def test_policy_always_restarts_a_clean_exit(make):
    core = make({"m": {"restart": {"policy": "always"}}})
    ready(core)
    core.exit("m", CLEAN)
    assert core.get("m").state == "restarting"


def test_policy_no_restarts_nothing(make):
    core = make({"m": {"restart": {"policy": "no"}}})
    ready(core)
    core.exit("m", CRASH)
    assert core.get("m").state == "failed"


def test_a_restart_that_fails_to_start_counts_as_a_crash(core):
    to_restart_loading(core)
    waiter = []
    core.manager.load("m", lambda b, e: waiter.append(e))       # joins the restart
    core.exit("m", ExitInfo(code=2))
    backend = core.get("m")
    assert backend.state == "restarting" and backend.restarts == 1
    assert backend.reason == "backend exited with code 2 during a restart; restarting in 2 s"
    assert waiter[0].code == errors.LOAD_FAILED


def test_a_stalled_restart_is_stopped_and_counts_as_a_crash(core):
    to_stalled(core)
    backend = core.get("m")
    assert backend.state == "loading" and backend.phase == states.STOPPING_STALLED
    assert core.running("m").stops == [7]
    with pytest.raises(ServiceError) as caught:
        core.manager.ready_backend("m")
    assert caught.value.code == errors.NOT_LOADED and "being stopped" in caught.value.message
    core.exit("m", CLEAN)                       # even a clean exit: it was stopped for failing
    assert backend.state == "restarting"
    assert backend.error.startswith("model m did not answer its handshake within 30 s")


def test_load_model_during_the_backoff_starts_now(core):
    crash_to_restarting(core)
    mload(core)
    backend = core.get("m")
    assert backend.phase == states.LOADING and backend.next_restart_at is None
    assert core.loop.pending() == [30]          # only the startup timer; no restart to come
    core.exit("m", CRASH)                       # a load-model's start-up failure is final
    assert backend.state == "failed"


def test_a_new_load_of_a_failed_model_starts_a_fresh_history(core):
    ready(core)
    for _ in range(3):
        core.exit("m", CRASH)
        core.loop.advance(4)
        core.ready("m")
    core.exit("m", CRASH)
    assert core.get("m").error_code == errors.FLAPPING
    ready(core)
    core.exit("m", CRASH)
    assert core.get("m").state == "restarting"
    assert core.get("m").last_error.startswith("backend exited with code 1 while ready; gave")


# -- liveness --------------------------------------------------------------------------------
def test_a_hung_backend_loses_its_endpoint_is_stopped_and_restarted(core):
    to_hung(core)
    backend = core.get("m")
    assert backend.state == "ready" and backend.phase == states.STOPPING_HUNG
    assert backend.reason == "missed 3 pings; stopping it"
    assert backend.as_status()["endpoint"] is None and not backend.answers_clients
    assert core.running("m").stops == [7]
    for ask in (core.manager.ready_backend, mload):
        with pytest.raises(ServiceError) as caught:
            ask(core, "m") if ask is mload else ask("m")
        assert caught.value.message == "model m is being stopped: missed 3 pings"
    core.liveness.last.hang("again")            # a second report changes nothing
    assert core.running("m").stops == [7]
    core.exit("m", CLEAN)
    assert backend.state == "restarting"
    assert backend.error == "missed 3 pings; it printed nothing"
    assert ("m", "ready", "restarting") == core.events[-1]


def test_liveness_starts_when_ready_and_stops_on_unload(core):
    to_hung(core)
    check = core.liveness.last
    assert check.settings.interval == 1
    munload(core)
    assert check.stopped


# -- unloading -------------------------------------------------------------------------------
def test_unload_of_a_ready_model_waits_for_the_exit(core):
    ready(core)
    munload(core)
    backend = core.get("m")
    assert backend.state == "unloading" and core.unloaded == []
    assert core.running("m").stops == [7]
    munload(core)                                # a second unload waits for the same exit
    core.exit("m")
    assert core.unloaded == ["m", "m"] and core.get("m") is None
    assert core.events[-2:] == [("m", "ready", "unloading"), ("m", "unloading", "unloaded")]


def test_unload_during_the_load_cancels_it(core):
    mload(core)
    munload(core)
    assert last_error(core).code == errors.CANCELLED
    assert last_error(core).message == "load of m cancelled by unload-model"
    assert core.probes.last.cancelled
    with pytest.raises(ServiceError) as caught:
        mload(core)
    assert caught.value.code == errors.BAD_REQUEST


def test_unload_during_the_backoff_cancels_the_restart(core):
    crash_to_restarting(core)
    munload(core)
    assert core.unloaded == ["m"] and core.get("m") is None
    assert core.loop.pending() == []             # the restart timer is cancelled
    core.loop.advance(10)
    assert len(core.launcher.started) == 1       # no restart came


def test_unload_of_a_failed_model_forgets_it(core):
    mload(core)
    core.exit("m", CRASH)
    munload(core)
    assert core.unloaded == ["m"] and core.get("m") is None


def test_unload_of_an_unknown_or_unloaded_model(core):
    with pytest.raises(ServiceError) as caught:
        munload(core)
    assert caught.value.code == errors.NOT_LOADED


def test_a_failed_model_still_stopping_is_forgotten_once_gone(core):
    to_failed_stopping(core)
    munload(core)
    assert core.get("m").state == "failed" and core.unloaded == []
    core.exit("m")
    assert core.unloaded == ["m"] and core.get("m") is None


def test_a_load_of_a_failed_model_still_stopping_starts_once_it_is_gone(core):
    to_failed_stopping(core)
    mload(core)
    assert len(core.launcher.started) == 1
    core.exit("m")
    assert len(core.launcher.started) == 2 and core.get("m").phase == states.LOADING
    core.ready("m")
    assert core.answers[-1] == ("m", core.get("m"), None)


def test_an_unload_overtaking_a_load_of_a_failed_stopping_model_cancels_it(core):
    to_failed_stopping(core)
    mload(core)
    munload(core)
    assert last_error(core).code == errors.CANCELLED
    core.exit("m")
    assert core.get("m") is None and core.unloaded == ["m"]


def test_a_load_after_an_unload_of_a_failed_stopping_model_starts_when_gone(core):
    to_failed_stopping(core)
    munload(core)
    mload(core)
    core.exit("m")
    assert core.unloaded == ["m"]                # that process is gone, as asked
    assert core.get("m").phase == states.LOADING


def test_an_exit_of_an_older_process_is_ignored(core):
    mload(core)
    core.exit("m", CRASH)
    old = core.running("m")
    old.exited = False                           # its exit is reported late, after a new load
    mload(core)
    core.ready("m")
    old.exit(ExitInfo(code=9))
    assert core.get("m").state == "ready" and core.get("m").last_exit.code == 1


def test_unload_all_stops_every_backend(make):
    core = make({"a": {}, "b": {}, "c": {}})
    ready(core, "a")
    mload(core, "b")
    core.launcher.refuse = "gone"
    mload(core, "c")                             # failed, no process
    gone = []
    core.manager.unload_all(lambda: gone.append(True))
    assert core.get("c") is None and gone == []
    assert [error.code for name, _, error in core.answers if name == "c"] == [
        errors.LOAD_FAILED]
    core.exit("a")
    assert gone == []
    core.exit("b")
    assert gone == [True] and core.registry.backends == {}
    assert core.answers[-1][2].message == "load of b cancelled by shutdown"


def test_unload_all_with_nothing_loaded_is_done_at_once(core):
    gone = []
    core.manager.unload_all(lambda: gone.append(True))
    assert gone == [True]


def test_detach_all_leaves_backends_running(core):
    mload(core)
    core.manager.detach_all()
    assert last_error(core).code == errors.SHUTTING_DOWN
    assert core.running("m").stops == [] and core.probes.last.cancelled


# -- reloads ---------------------------------------------------------------------------------
def changed(core, name="m", **fields):
    return dataclasses.replace(core.manager.config.models[name], **fields)


def test_a_changed_definition_restarts_a_ready_backend(core):
    ready(core)
    spec = changed(core, command=("backend", "--new"))
    core.manager.config.models["m"] = spec
    core.manager.reload_backend(core.get("m"), spec)
    assert core.get("m").state == "unloading"
    assert core.get("m").reason == "definition changed in the configuration"
    core.exit("m")
    assert core.get("m").state == "loading"
    assert core.launcher.last.launch.argv[:2] == ("backend", "--new")


def test_a_changed_definition_of_a_failed_model_is_kept_for_the_next_load(core):
    mload(core)
    core.exit("m", CRASH)
    spec = changed(core, stop_timeout=1.0)
    core.manager.reload_backend(core.get("m"), spec)
    assert core.get("m").spec is spec and len(core.launcher.started) == 1


def test_a_changed_definition_of_an_unloading_model_waits(core):
    ready(core)
    munload(core)
    core.manager.reload_backend(core.get("m"), changed(core))
    core.exit("m")
    assert core.get("m") is None and len(core.launcher.started) == 1


# -- adoption --------------------------------------------------------------------------------
def test_an_adopted_unit_is_probed_and_keeps_its_start_time(core):
    handle = adopt(core)
    backend = core.get("m")
    assert backend.state == "loading" and backend.phase == states.ADOPTING
    assert backend.started_at == WALL_START - 50
    assert backend.uptime(core.loop.clock()) == 50
    core.ready("m")
    assert backend.reason == "adopted unit answered the handshake"
    assert len(core.launcher.started) == 0
    handle.exit(CRASH)
    assert backend.state == "restarting"


def test_a_unit_that_ended_unwatched_is_failed(core):
    adopt(core, alive=False)
    backend = core.get("m")
    assert backend.state == "failed"
    assert backend.error == ("unit backend-m.service exited with code 3 while the daemon was "
                             "not running")


def test_a_unit_of_a_model_no_longer_configured_is_stopped(core):
    handle = adopt(core, model="gone")
    assert handle.stops == [7] and core.get("gone") is None


# -- what the manager hands on and writes down -----------------------------------------------
def test_probes_and_liveness_checks_get_the_backend_s_endpoint_and_name(core):
    to_hung(core)
    probe, check = core.probes.last, core.liveness.last
    endpoint = core.get("m").endpoint
    assert (probe.loop, probe.context, probe.endpoint, probe.model) == (
        core.loop, core.context, endpoint, "m")
    assert check.asked == (core.loop, core.context, endpoint, "m", ["inference"])


def test_counts_of_loads_failures_restarts_and_exits(core):
    ready(core)
    core.exit("m", CRASH)
    core.loop.advance(1)
    core.exit("m", CRASH)
    core.loop.advance(2)
    core.ready("m")
    munload(core)
    core.exit("m")
    assert core.manager.stats == {"loads": 3, "load_failures": 0, "restarts": 2, "exits": 3}


def test_the_reasons_status_shows(core):
    ready(core)
    munload(core)
    core.exit("m")
    to_failed_stopping(core)
    core.exit("m")
    munload(core)
    crash_to_restarting(core)
    munload(core)
    core.launcher.refuse = "no such file"
    mload(core)
    assert [r for r in core.reasons if r[1] in ("unloaded", "failed")] == [
        ("m", "unloaded", "killed by SIGTERM"),
        ("m", "failed", "model m did not answer its handshake within 30 s; it printed "
                        "nothing"),
        ("m", "unloaded", "unload-model"),
        ("m", "unloaded", "unload-model"),
        ("m", "failed", "no such file")]
    assert core.get("m").reason == "no such file"
    assert core.reasons[-2] == ("m", "loading", "load requested")


def test_a_failed_stopping_model_keeps_its_reason_through_the_exit(core):
    to_failed_stopping(core)
    reason = core.get("m").reason
    mload(core)
    munload(core)
    assert core.get("m").reason == reason
    core.exit("m")
    assert core.reasons[-1] == ("m", "unloaded", "unloaded after failure")


def test_a_stalled_restart_keeps_its_reason_and_answers_waiters(core):
    to_restart_loading(core)
    waiter = []
    core.manager.load("m", lambda b, e: waiter.append(e))
    reason = core.get("m").reason
    core.loop.advance(30)
    assert core.get("m").reason == reason == "restarting"
    assert waiter[0].code == errors.STARTUP_TIMEOUT and waiter[0].data == {"model": "m"}
    assert waiter[0].message.startswith("model m did not answer its handshake within 30 s")


def test_errors_carry_the_model_name(core):
    mload(core)
    core.exit("m", CRASH)
    assert last_error(core).data["model"] == "m"
    ready(core)
    waiter = []
    core.exit("m", CRASH)
    core.loop.advance(1)
    core.manager.load("m", lambda b, e: waiter.append(e))
    core.exit("m", CRASH)
    assert waiter[0].data == {"model": "m"}
    assert waiter[0].message == "backend exited with code 1 during a restart; restarting in 2 s"
    assert core.get("m").error_code == errors.LOAD_FAILED


def test_a_restart_starts_with_fresh_errors(core):
    to_restart_loading(core)
    backend = core.get("m")
    assert backend.error is None and backend.error_code is None
    assert backend.stop_reason is None and backend.progress is None
    assert backend.started_at == core.loop.wall_clock()
    core.loop.advance(0.25)
    core.ready("m")
    assert backend.reason == "answered the handshake after 0.250 s"
    assert backend.progress is None


def test_a_unit_s_journal_lines_are_the_output_when_the_pipe_gave_none(make):
    core = make()
    mload(core)
    core.exit("m", ExitInfo(code=1, output=("from the journal",)))
    assert list(core.get("m").output) == ["from the journal"]
    mload(core)
    core.running("m").say("own line")
    core.exit("m", ExitInfo(code=1, output=("journal",)))
    assert list(core.get("m").output) == ["own line"]
    assert last_error(core).message.endswith("; last output: own line")


def test_a_unit_without_output_points_at_its_journal(tmp_path):
    core = Core({"m": {}}, tmp_path, units=True)
    mload(core)
    core.exit("m", CRASH)
    assert core.get("m").unit == core.running("m").unit
    assert last_error(core).message.endswith(f"; its output: journalctl -u "
                                             f"{core.running('m').unit}")
    assert core.get("m").reason.startswith("model m backend exited with code 1 during start-up")


def test_output_lines_are_logged_with_the_model_name(core, caplog):
    mload(core)
    caplog.set_level("INFO")
    core.running("m").say("hello")
    assert ("backend_mgmt.backend", 20, "[m] hello") in caplog.record_tuples


def test_exits_are_logged_warning_unless_asked_for(core, caplog):
    caplog.set_level("INFO", logger="backend_mgmt.manager")
    ready(core)
    core.exit("m", CRASH)
    core.loop.advance(1)
    core.ready("m")
    munload(core)
    core.exit("m")
    lines = [(r.levelno, r.getMessage()) for r in caplog.records
             if r.name == "backend_mgmt.manager"]
    assert lines == [(30, "model m: backend pid 1000 exited with code 1"),
                     (20, "model m: backend pid 1001 killed by SIGTERM")]


def test_a_hung_backend_is_logged(core, caplog):
    caplog.set_level("INFO", logger="backend_mgmt.manager")
    to_hung(core)
    assert ("backend_mgmt.manager", 30, "model m: missed 3 pings; stopping it") in \
        caplog.record_tuples


def test_progress_lines_are_logged(core, caplog):
    caplog.set_level("DEBUG", logger="backend_mgmt.manager")
    mload(core)
    pid = core.running("m").pid
    core.manager.on_progress(4, {"STATUS": "x"})
    core.manager.on_progress(pid, {"STATUS": "s" * 300, "EXTEND_TIMEOUT_USEC": "1x"})
    core.manager.on_progress(pid, {"EXTEND_TIMEOUT_USEC": "40000000"})
    core.manager.on_progress(pid, {"STATUS": "", "EXTEND_TIMEOUT_USEC": "50000000"})
    assert core.get("m").progress == ""
    assert [r.getMessage() for r in caplog.records] == [
        "progress message from pid 4, which is no backend of ours",
        "model m: ignoring EXTEND_TIMEOUT_USEC=1x",
        "model m: start-up deadline extended by the backend to 40 s from now (" + "s" * 200
        + ")",
        "model m: start-up deadline extended by the backend to 50 s from now"]


def test_progress_after_the_start_up_moves_no_deadline(core):
    ready(core)
    core.manager.on_progress(core.running("m").pid, {"EXTEND_TIMEOUT_USEC": "40000000"})
    assert core.loop.pending() == []


def test_extend_by_exactly_the_deadline_keeps_the_timer(core):
    mload(core)
    timer = core.get("m").startup_timer
    core.manager.on_progress(core.running("m").pid, {"EXTEND_TIMEOUT_USEC": "30000000"})
    assert core.get("m").startup_timer is timer


def test_a_timeout_extended_by_a_second_or_less_says_nothing_of_it(core):
    mload(core)
    core.manager.on_progress(core.running("m").pid, {"EXTEND_TIMEOUT_USEC": "31000000"})
    core.loop.advance(31)
    assert "extended" not in last_error(core).message


def test_a_unit_s_progress_is_matched_by_its_control_group(tmp_path, monkeypatch):
    core = Core({"m": {}, "n": {}}, tmp_path, units=True)
    mload(core, "n")
    core.exit("n", CRASH)                        # no process: never matched
    mload(core)
    core.running("m").control_group = "/system.slice/m.service"
    asked = []
    monkeypatch.setattr("backend_mgmt.progress.process_in_cgroup",
                        lambda pid, group: asked.append((pid, group)) or True)
    core.manager.on_progress(77, {"STATUS": "unit says"})
    assert asked == [(77, "/system.slice/m.service")]
    assert core.get("m").progress == "unit says"


@pytest.mark.parametrize("value, seconds", [
    ("0", 0.0), ("1500000", 1.5), ("9" * 20, 24 * 3600.0), ("1000000", 1.0)])
def test_extend_seconds(value, seconds):
    assert extend_seconds(value) == seconds


@pytest.mark.parametrize("value", ["", "1x", "-1", " 1", "+1", "٣", "1" * 21, "1.5"])
def test_extend_seconds_refuses_anything_but_plain_digits(value):
    assert extend_seconds(value) is None


def test_endpoint_for_a_model(tmp_path):
    assert endpoint_for("demo", "/run/b") == "ipc:///run/b/models/demo-" + \
        endpoint_for("demo", "/run/b").split("demo-")[1]
    path = endpoint_for("demo", "/run/b")[len("ipc://"):]
    assert path.startswith("/run/b/models/demo") and path.endswith("/backend.sock")
    assert endpoint_for("demo", "/run/b") != endpoint_for("Demo", "/run/b")


def test_endpoint_for_a_long_name_fits_a_socket_path():
    runtime_dir = "/run/" + "d" * 40
    endpoint = endpoint_for("x" * 500, runtime_dir)
    assert len(endpoint[len("ipc://"):].encode()) <= 107
    assert endpoint.startswith(f"ipc://{runtime_dir}/models/")
    short = endpoint_for("y" * 500, runtime_dir)
    assert short != endpoint
    fits = endpoint_for("z" * 40, "/run/b")
    assert len(fits) - len("ipc://") <= 107 and "zzzz" in fits


def test_ready_backend_says_why_not(core):
    def why():
        with pytest.raises(ServiceError) as caught:
            core.manager.ready_backend("m")
        assert caught.value.code == errors.NOT_LOADED
        return caught.value.message
    assert why() == "model m is not loaded"
    mload(core)
    assert why() == "model m is loading"
    core.exit("m", CRASH)
    assert why() == ("model m is failed: model m backend exited with code 1 during start-up; "
                     "it printed nothing")
    ready(core)
    assert core.manager.ready_backend("m") is core.get("m")


def test_unload_of_a_model_not_loaded_says_so(core):
    with pytest.raises(ServiceError) as caught:
        munload(core)
    assert caught.value.message == "model m is not loaded"


def test_a_reload_that_fails_is_logged(core, caplog):
    ready(core)
    core.manager.reload_backend(core.get("m"), changed(core))
    core.launcher.refuse = "gone"
    core.exit("m")
    assert ("backend_mgmt.manager", 30,
            "model m: reload with its new definition failed: gone") in caplog.record_tuples
    assert core.get("m").state == "failed"


def test_a_reload_of_a_model_removed_meanwhile_is_logged(core, caplog):
    ready(core)
    core.manager.reload_backend(core.get("m"), changed(core))
    del core.manager.config.models["m"]
    core.exit("m")
    assert [(r.levelno, r.getMessage()) for r in caplog.records
            if r.name == "backend_mgmt.manager" and "reload" in r.getMessage()] == [
        (30, "model m: not reloaded: " + caplog.records[-1].getMessage().split(
            "not reloaded: ")[-1])]
    assert core.get("m") is None


def test_a_reload_that_succeeds_logs_nothing(core, caplog):
    ready(core)
    core.manager.reload_backend(core.get("m"), changed(core))
    core.exit("m")
    core.ready("m")
    assert not [r for r in caplog.records if r.levelno >= 30]


def test_unload_stops_with_the_model_s_stop_timeout(core):
    crash_to_restarting(core)
    core.loop.advance(1)
    munload(core)
    assert core.running("m").stops == [7]
    assert last_error(core) is None


def test_detach_all_says_the_service_is_restarting(core):
    mload(core)
    core.manager.detach_all()
    assert last_error(core).message == "the service is restarting; load again once it is back"


# -- adoption, more --------------------------------------------------------------------------
def test_an_adopted_unit_with_an_unchanged_definition_keeps_running(core):
    launch = core.manager._launch_spec(core.manager.config.models["m"],
                                       "tcp://127.0.0.1:20000")
    handle = adopt(core, definition=launch.definition)
    assert handle.stops == [] and core.get("m").phase == states.ADOPTING


def test_an_adopted_unit_with_a_changed_definition_is_restarted(core):
    handle = adopt(core, definition="an older one")
    assert handle.stops == [7] and core.get("m").state == "unloading"
    handle.exit()
    assert core.get("m").state == "loading" and len(core.launcher.started) == 1


def test_an_adopted_unit_keeps_its_unit_endpoint_and_times(core):
    adopt(core, endpoint="tcp://127.0.0.1:5555", started_at=None)
    backend = core.get("m")
    assert backend.unit == "backend-m.service" and backend.endpoint == "tcp://127.0.0.1:5555"
    assert backend.started_at == WALL_START and backend.started_mono == 0
    assert backend.state_since == WALL_START
    assert core.probes.last.endpoint == "tcp://127.0.0.1:5555"


def test_an_adopted_unit_from_the_future_counts_no_negative_uptime(core):
    adopt(core, started_at=WALL_START + 100)
    assert core.get("m").started_mono == 0


def test_an_adopted_unit_without_endpoint_gets_the_model_s(tmp_path):
    core = Core({"m": {"endpoint": None}}, tmp_path)
    adopt(core, endpoint=None)
    assert core.get("m").endpoint == endpoint_for("m", str(tmp_path))


def test_a_dead_unit_s_exit_is_shown(core):
    adopt(core, alive=False)
    backend = core.get("m")
    assert backend.last_exit.code == 3 and backend.last_exit_at == WALL_START
    assert backend.error_code == errors.LOAD_FAILED and backend.unit == "backend-m.service"


def test_an_adopted_gpu_unit_takes_its_devices(make):
    core = make({"m": {"resources": {"gpus": 2}}}, gpus=[0, 1, "GPU-x"])
    adopt(core, gpus="0,GPU-x")
    assert core.get("m").gpu_devices == (0, "GPU-x")


def test_an_adopted_unit_of_a_model_without_placed_gpus_ignores_them(core):
    adopt(core, gpus="0")
    assert core.get("m").gpu_devices is None


def test_what_a_backend_is_started_with(make):
    core = make({"m": {"stop_timeout": 4, "startup_timeout": 30, "resources": {"gpus": "1,2"},
                       "env": {"EXTRA": "x"}, "fullname": "org/m"}})
    core.loop.advance(3)
    mload(core)
    launch = core.launcher.last.launch
    assert launch.endpoint == core.get("m").endpoint == "tcp://127.0.0.1:20000"
    assert launch.stop_timeout == 4 and launch.resources.gpus == "1,2"
    assert launch.env == {
        "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": "1,2", "EXTRA": "x",
        "NOTIFY_SOCKET": "@progress", "BACKEND_MGMT_NOTIFY_SOCKET": "@progress",
        "BACKEND_MGMT_ENDPOINT": "tcp://127.0.0.1:20000", "BACKEND_MGMT_MODEL": "m",
        "BACKEND_MGMT_MODEL_NAME": "org/m"}
    assert core.get("m").reason == "starting"
    core.loop.advance(30)
    assert "extended" not in last_error(core).message     # started at 3: waited exactly 30
    assert core.manager.stats["load_failures"] == 1
    mload(core)
    assert core.manager.stats["load_failures"] == 1      # joined the failed one's stop


def test_an_endpoint_exactly_at_the_socket_path_limit_keeps_the_model_s_name():
    runtime_dir = "/" + "r" * 72                # .../models/demo-<8 hex>/backend.sock: 107
    endpoint = endpoint_for("demo", runtime_dir)
    assert len(endpoint[len("ipc://"):].encode()) == 107
    assert endpoint.startswith(f"ipc://{runtime_dir}/models/demo-")


def test_a_long_name_s_endpoint_is_still_its_directory_s_backend_sock():
    endpoint = endpoint_for("x" * 500, "/run/" + "d" * 40)
    assert endpoint.endswith("/backend.sock")


def test_a_reload_refused_logs_the_refusal(core, caplog):
    ready(core)
    core.manager.reload_backend(core.get("m"), changed(core))
    del core.manager.config.models["m"]
    with pytest.raises(ServiceError) as refusal:
        core.manager.resolve("m")
    core.exit("m")
    assert ("backend_mgmt.manager", 30,
            f"model m: not reloaded: {refusal.value.message}") in caplog.record_tuples


# -- adoption of a unit that was ready ---------------------------------------------------------
def adopt_ready(core, **record):
    return adopt(core, was_ready=True, ready_at=WALL_START - 20,
                 protocols=("inference", "ping"), **record)


def test_an_adopted_unit_that_was_ready_is_served_at_once(make):
    core = make({"m": {"fullname": "org/m"}})
    handle = adopt_ready(core)
    backend = core.get("m")
    assert backend.state == "ready" and core.manager.ready_backend("m") is backend
    assert backend.protocols == ["inference", "ping"] and backend.ready_at == WALL_START - 20
    assert backend.reason == "adopted unit was ready; confirming it with a handshake"
    assert core.launcher.started == [] and handle.stops == []
    probe = core.probes.last
    assert (probe.loop, probe.context, probe.endpoint, probe.model) == (
        core.loop, core.context, "tcp://127.0.0.1:20000", "org/m")


def test_an_adopted_ready_unit_s_handshake_confirms_it_and_starts_its_liveness_check(
        make, caplog):
    core = make({"m": {"fullname": "org/m", "stop_timeout": 7, "liveness": {"interval": 1}}})
    caplog.set_level("INFO", logger="backend_mgmt.manager")
    handle = adopt_ready(core)
    core.probes.last.answer(["inference"])
    backend = core.get("m")
    assert backend.state == "ready" and backend.protocols == ["inference"]
    assert core.loop.pending() == []            # no handshake deadline left
    assert ("backend_mgmt.manager", 20,
            "model m: adopted unit backend-m.service answered the handshake") in \
        caplog.record_tuples
    check = core.liveness.last
    assert check.asked == (core.loop, core.context, "tcp://127.0.0.1:20000", "org/m",
                           ["inference"])
    assert check.settings.interval == 1
    check.hang("missed 3 pings")
    assert backend.phase == states.STOPPING_HUNG and handle.stops == [7]


def test_an_adopted_ready_unit_that_does_not_answer_in_time_is_hung(core):
    handle = adopt_ready(core)
    core.loop.advance(29.9)
    assert handle.stops == [] and core.get("m").state == "ready"
    core.loop.advance(0.1)
    backend = core.get("m")
    assert backend.phase == states.STOPPING_HUNG and handle.stops == [7]
    assert backend.stop_reason == ("adopted backend failed its handshake: no answer within "
                                   "30 s (startup_timeout)")
    assert core.probes.last.cancelled
    handle.exit(CRASH)
    core.loop.advance(0)
    assert backend.state == "restarting"


def test_an_adopted_ready_unit_that_fails_its_handshake_is_hung(core):
    handle = adopt_ready(core)
    core.probes.last.fail("wrong model answered")
    backend = core.get("m")
    assert backend.phase == states.STOPPING_HUNG and handle.stops == [7]
    assert backend.stop_reason == "adopted backend failed its handshake: wrong model answered"
    assert core.loop.pending() == []            # the handshake deadline is gone too


def test_an_adopted_unit_being_stopped_is_unloaded_not_served_nor_restarted(core):
    """An unload the previous daemon began (its unit deactivating: systemd sends SIGKILL
    after TimeoutStopSec) goes on: the backend is unloading, then forgotten when it ends,
    however it ends. Adopted as running, it was probed, and the SIGKILL then looked like a
    crash, which the restart policy answered with a new backend."""
    handle = adopt(core, stopping=True, ready_at=WALL_START - 20)   # (not active: not
                                                                     # was_ready either)
    backend = core.get("m")
    assert backend.state == "unloading" and handle.stops == [7]
    assert backend.reason == ("unit backend-m.service was being stopped when the previous "
                              "daemon exited")
    assert core.probes.made == []               # not probed: it is on its way out
    handle.exit(CRASH)                          # killed after its stop timeout
    core.loop.advance(60)
    assert core.get("m") is None and core.launcher.started == []


def test_an_adopted_ready_unit_unloaded_before_its_handshake_is_just_unloaded(core):
    handle = adopt_ready(core)
    munload(core)
    assert core.probes.last.cancelled and core.loop.pending() == []
    core.loop.advance(60)
    assert handle.stops == [7] and core.get("m").state == "unloading"


def test_an_adopted_ready_unit_with_a_changed_definition_is_restarted_not_served(core):
    handle = adopt_ready(core, definition="an older one")
    assert core.get("m").state == "unloading" and handle.stops == [7]
    with pytest.raises(ServiceError):
        core.manager.ready_backend("m")


def test_a_unit_of_a_model_no_longer_configured_is_logged(core, caplog):
    adopt(core, model="gone")
    assert ("backend_mgmt.manager", 30, "unit backend-m.service runs model 'gone', which is "
            "no longer configured; stopping it") in caplog.record_tuples


def test_a_unit_that_records_no_definition_is_kept_and_logged(core, caplog):
    caplog.set_level("INFO", logger="backend_mgmt.manager")
    handle = adopt(core, definition=None)
    assert handle.stops == []
    assert ("backend_mgmt.manager", 20, "model m: unit backend-m.service records no definition "
            "(an older daemon started it); kept as it runs") in caplog.record_tuples


def test_an_adopted_unit_on_the_daemon_s_endpoint_with_its_definition_keeps_running(tmp_path):
    core = Core({"m": {"endpoint": None}}, tmp_path)
    endpoint = endpoint_for("m", str(tmp_path))
    definition = core.manager._launch_spec(core.manager.config.models["m"], endpoint).definition
    handle = adopt(core, endpoint=endpoint, definition=definition)
    assert handle.stops == [] and core.get("m").phase == states.ADOPTING


# -- refusals, counts and reasons, more --------------------------------------------------------
def test_an_unknown_model_s_refusal_names_it(core):
    with pytest.raises(ServiceError) as caught:
        mload(core, "nope")
    assert "nope" in caught.value.message


def test_a_ready_model_s_load_is_answered_with_its_backend(core):
    ready(core)
    mload(core)
    assert core.answers[-1] == ("m", core.get("m"), None)


def test_a_load_of_a_hung_or_unloading_model_is_refused_with_its_code(core):
    to_hung(core)
    with pytest.raises(ServiceError) as caught:
        mload(core)
    assert caught.value.code == errors.NOT_LOADED
    munload(core)
    with pytest.raises(ServiceError) as caught:
        mload(core)
    assert caught.value.code == errors.BAD_REQUEST
    assert caught.value.message == ("model m is being unloaded; load it again once "
                                    "unload-model has returned")


def test_a_timeout_extended_by_more_than_a_second_says_so(core):
    mload(core)
    core.manager.on_progress(core.running("m").pid, {"EXTEND_TIMEOUT_USEC": "31600000"})
    core.loop.advance(31.6)
    assert "(extended by the backend to 32 s)" in last_error(core).message


def test_each_failed_load_is_counted(core):
    for _ in range(2):
        mload(core)
        core.exit("m", CRASH)
    assert core.manager.stats["load_failures"] == 2


def test_a_waiter_that_raises_is_logged_and_the_others_are_answered(core, caplog):
    answered = []

    def broken(backend, error):
        raise RuntimeError("client gone")
    core.manager.load("m", broken)
    core.manager.load("m", lambda backend, error: answered.append(backend))
    core.ready("m")
    assert answered == [core.get("m")]
    assert ("backend_mgmt.manager", 40, "model m: answering a waiting load failed") in \
        caplog.record_tuples


def test_a_failed_backend_keeps_its_reason_when_its_process_exits(core):
    to_failed_stopping(core)
    reason = core.get("m").reason
    core.exit("m")
    assert core.get("m").phase == states.FAILED and core.get("m").reason == reason


def test_a_crash_not_restarted_by_policy_is_a_load_failure(make):
    core = make({"m": {"restart": {"policy": "no"}}})
    ready(core)
    core.exit("m", CRASH)
    assert core.get("m").error_code == errors.LOAD_FAILED


def test_unload_while_failed_stopping_cancels_the_waiting_load_and_stops_again(core):
    to_failed_stopping(core)
    mload(core)
    munload(core)
    assert last_error(core).code == errors.CANCELLED
    assert last_error(core).message == "load of m cancelled by unload-model"
    assert core.running("m").stops == [7, 7]


# -- adoption, the rest ------------------------------------------------------------------------
def test_every_unit_found_is_adopted_whatever_came_before_it(make):
    core = make({"a": {}, "b": {}, "c": {}})

    def found(model, alive, stopping=False):
        handle = FakeRunning(None, 7, None, None, unit=f"backend-{model}.service")
        record = types.SimpleNamespace(
            model=model, unit=f"backend-{model}.service", endpoint=None, started_at=None,
            gpus=None, stop_timeout=1, definition=None, ready_at=None, protocols=None)
        return Adoption(record, running=handle if alive else None,
                        ended=None if alive else ExitInfo(code=1), stopping=stopping)
    core.manager.adopt([found("gone", True), found("a", False), found("c", True, True),
                        found("b", True)])
    assert core.get("a").state == "failed" and core.get("b").phase == states.ADOPTING
    assert core.get("c").state == "unloading"


def test_a_unit_that_ended_unwatched_shows_why_as_its_reason(core):
    adopt(core, alive=False)
    assert core.get("m").reason == core.get("m").error


def test_an_adopted_unit_s_reason_names_its_unit_and_pid(core):
    adopt(core)
    assert core.get("m").reason == ("adopting unit backend-m.service (pid 4242) from a "
                                    "previous daemon")


def test_restarting_a_unit_on_a_changed_definition_is_logged(core, caplog):
    caplog.set_level("INFO", logger="backend_mgmt.manager")
    adopt(core, definition="an older one")
    assert ("backend_mgmt.manager", 20, "model m: unit backend-m.service was started from an "
            "earlier definition of the model; restarting it on the current one") in \
        caplog.record_tuples


def test_readiness_is_noted_in_the_run_s_record_on_entering_and_leaving_ready(core):
    ready(core)
    munload(core)
    assert core.running("m").readiness == [["inference"], None]
