"""Parking (issue 13), in-process over the fakes (fakes.py, FakeParker): when the scheduler
parks instead of unloading, the host_memory budget, the second keep_alive stage, shared
wakes, failures, GPU memory never given twice, pinned models, a daemon restart. Expected
outcomes are README's ("Parking models"); nothing sleeps.
"""

import json

import pytest

from backend_mgmt import errors, states
from backend_mgmt.errors import ServiceError
from backend_mgmt.launchers.base import ExitInfo
from backend_mgmt.launchers.records import Adoption
from backend_mgmt.manager import PARKED_FILE
from fakes import Core, FakeRunning, PARK, big, parker

GiB = 1024 ** 3
CRASH = ExitInfo(code=1)
ONE_GPU = [{"id": 0, "memory": "80GiB"}]
TWO_GPUS = [{"id": 0, "memory": "80GiB"}, {"id": 1, "memory": "80GiB"}]


def answers_for(core, name):
    return [error for n, _, error in core.answers if n == name]


def reason_of(core, name, state):
    return [reason for n, s, reason in core.reasons if n == name and s == state][-1]


def park_ready(core, name):
    """``name`` loaded, then parked by eviction or by park-model: here by park-model."""
    core.load_ready(name)
    core.scheduler.park(name, core.parks.append)
    core.loop.advance(0)
    parker(core, name).succeed()


# -- park or unload --------------------------------------------------------------------------
def test_an_evicted_model_that_can_park_is_parked_and_its_gpu_freed_only_when_parked(make):
    core = make({"a": big(park=PARK), "b": big()}, gpus=ONE_GPU)
    core.load_ready("a")
    core.load("b")
    assert core.phase("a") == states.PARKING and parker(core, "a").calls == ["park"]
    assert core.evicted == [("a", "evicted to make room for b (GPU room); least recently "
                                  "used")]
    # Still parking: its GPU memory is still its own, b waits.
    assert "a" in core.scheduler.assignments and core.get("b") is None
    parker(core, "a").succeed()
    assert core.phase("a") == states.PARKED and core.get("a").reason.startswith("parked in ")
    assert "a" not in core.scheduler.assignments
    assert core.phase("b") == states.LOADING
    assert core.scheduler.assignments["b"].devices == (0,)
    assert core.running("a").stops == []                    # its process lives on


def test_a_model_without_park_is_unloaded_as_before(make):
    core = make({"a": big(), "b": big()}, gpus=ONE_GPU)
    core.load_ready("a")
    core.load("b")
    assert core.phase("a") == states.UNLOADING and core.parkers.made == []


def test_a_parked_model_holds_no_slot_of_max_loaded_models(make):
    core = make({"a": {"park": "protocol"}, "b": {}, "c": {}}, max_loaded_models=1)
    core.load_ready("a")
    core.load("b")
    parker(core, "a").succeed()
    assert core.phase("b") == states.LOADING and core.scheduler._count() == 1


# -- the host memory budget ------------------------------------------------------------------
def test_a_full_budget_unloads_a_parked_model(make):
    core = make({"a": big(park=PARK), "b": big(park=PARK), "c": big(park=PARK)},
                gpus=ONE_GPU, host_memory="100GiB")
    core.load_ready("a")
    core.load("b")
    parker(core, "a").succeed()                 # a parked: 60 of 100 GiB
    core.ready("b")
    core.load("c")                              # b must go: 60 more do not fit
    assert core.phase("a") == states.UNLOADING
    assert core.get("a").reason == ("host_memory 100 GiB full: unloaded to park b (the "
                                    "parked model used least lately)")
    assert core.phase("b") == states.PARKING
    core.exit("a")
    parker(core, "b").succeed()
    assert core.phase("b") == states.PARKED and core.phase("c") == states.LOADING
    assert core.scheduler.parked_host == {"b": 60 * GiB}


def test_a_model_too_big_for_the_budget_is_unloaded_instead(make):
    core = make({"a": big(park=PARK), "b": big(park=PARK),
                 "huge": {"park": PARK, "resources": {"gpus": 1, "gpu_memory": "60GiB",
                                                      "host_memory": "200GiB"}}},
                gpus=ONE_GPU, host_memory="100GiB")
    park_ready(core, "a")
    core.load_ready("huge")
    core.load("b")
    assert core.phase("huge") == states.UNLOADING
    assert core.phase("a") == states.PARKED              # not unloaded for nothing
    assert [p.backend.name for p in core.parkers.made if "park" in p.calls] == ["a"]


# -- idleness: park_after, then keep_alive ---------------------------------------------------
def test_idle_models_park_after_park_after_and_unload_at_keep_alive(make):
    core = make({"a": {"park": PARK, "park_after": 10, "keep_alive": 60}})
    core.load_ready("a")
    core.loop.advance(9.9)
    assert core.phase("a") == states.READY
    core.loop.advance(0.1)
    assert core.phase("a") == states.PARKING
    assert core.get("a").reason == "idle for 10.0 s (park_after 10 s)"
    parker(core, "a").succeed()
    core.loop.advance(49.9)
    assert core.phase("a") == states.PARKED
    core.loop.advance(0.1)                      # 60 s since its last use
    assert core.phase("a") == states.UNLOADING
    assert core.get("a").reason == "idle for 60.0 s (keep_alive 60 s) (parked)"


def test_a_use_of_a_parked_model_restarts_both_clocks(make):
    core = make({"a": {"park": PARK, "park_after": 10, "keep_alive": 60}})
    core.load_ready("a")
    core.loop.advance(10)
    parker(core, "a").succeed()
    core.loop.advance(40)
    core.load("a")                              # woken at 50 s
    parker(core, "a").succeed()
    core.loop.advance(9.9)
    assert core.phase("a") == states.READY      # its park_after runs from the wake
    core.loop.advance(0.1)
    assert core.phase("a") == states.PARKING
    parker(core, "a").succeed()
    core.loop.advance(49.8)                     # its keep_alive too: 60 s after the wake
    assert core.phase("a") == states.PARKED
    core.loop.advance(0.2)
    assert core.phase("a") == states.UNLOADING


# -- waking ----------------------------------------------------------------------------------
def test_many_loads_of_a_parked_model_share_one_wake(make):
    core = make({"a": {"park": PARK}})
    park_ready(core, "a")
    for _ in range(3):
        core.load("a")
    assert parker(core, "a").calls == ["park", "wake"] and core.phase("a") == states.WAKING
    assert answers_for(core, "a") == [None]         # the first load-model's answer only
    parker(core, "a").succeed()
    assert answers_for(core, "a") == [None] * 4 and core.phase("a") == states.READY
    assert core.get("a").reason == "woke in 0.0 s"
    assert len(core.launcher.started) == 1          # no cold start


def test_liveness_stops_while_parked_and_starts_again_when_woken(make):
    core = make({"a": {"park": PARK, "liveness": {"interval": 1}}})
    core.load_ready("a")
    first = core.liveness.last
    core.scheduler.park("a", core.parks.append)
    assert first.stopped
    parker(core, "a").succeed()
    core.load("a")
    parker(core, "a").succeed()
    assert len(core.liveness.made) == 2 and not core.liveness.last.stopped


# -- failures --------------------------------------------------------------------------------
def test_a_park_that_fails_unloads_the_model(make):
    core = make({"a": big(park=PARK), "b": big()}, gpus=ONE_GPU)
    core.load_ready("a")
    core.load("b")
    parker(core, "a").fail("cuda-checkpoint exited with 2")
    assert core.phase("a") == states.UNLOADING
    assert core.get("a").reason == "park failed: cuda-checkpoint exited with 2; unloading it"
    assert core.running("a").stops == [10.0]
    core.exit("a")
    assert core.get("a") is None and core.phase("b") == states.LOADING


def test_a_wake_that_times_out_restarts_the_model_cold_under_its_policy(make):
    core = make({"a": {"park": PARK, "resources": {"gpus": 1, "gpu_memory": "60GiB"},
                       "restart": {"backoff_initial": 1}}}, gpus=TWO_GPUS)
    park_ready(core, "a")
    core.load("a")
    parker(core, "a").time_out()
    backend = core.get("a")
    assert backend.phase == states.STOPPING_STALLED
    assert backend.reason == "wake failed: no answer within 5 s; stopping it to restart it cold"
    assert answers_for(core, "a")[-1].code == errors.LOAD_FAILED
    core.exit("a")
    assert backend.phase == states.RESTARTING
    assert backend.reason == "wake failed: no answer within 5 s; restarting in 1 s"
    core.loop.advance(1)
    assert backend.phase == states.RESTART_LOADING and len(core.launcher.started) == 2
    # On the device it had, which it holds all along.
    assert core.launcher.last.launch.env["CUDA_VISIBLE_DEVICES"] == "0"
    assert core.scheduler.assignments["a"].devices == (0,)


def test_a_parked_backend_that_dies_is_reported_and_unloaded(make):
    core = make({"a": {"park": PARK}})
    park_ready(core, "a")
    core.exit("a", CRASH)
    assert core.get("a") is None
    assert reason_of(core, "a", "unloaded") == "backend exited with code 1 while parked; " \
                                                "unloaded"
    assert core.scheduler.parked_host == {} and core.scheduler.uses == {}
    core.load("a")                                  # a cold load next time
    assert len(core.launcher.started) == 2


def test_an_unload_overtaking_a_park_cancels_it(make):
    core = make({"a": {"park": PARK}})
    core.load_ready("a")
    core.scheduler.park("a", core.parks.append)
    core.unload("a")
    assert parker(core, "a").calls == ["park", "cancel"]
    assert core.parks == ["cancelled by unload-model"]
    core.exit("a")
    assert core.unloaded == ["a"]


# -- GPU memory is never given twice ---------------------------------------------------------
def test_a_wake_waits_for_its_own_device_even_when_another_is_free(make):
    core = make({"a": big(park=PARK), "b": big()}, gpus=TWO_GPUS)
    park_ready(core, "a")                           # parked; it ran on GPU 0
    assert core.get("a").gpu_devices == (0,)
    core.load("b")                                  # takes GPU 0 (best fit, config order)
    assert core.scheduler.assignments["b"].devices == (0,)
    core.load("a")                                  # GPU 1 is free, but a cannot move
    assert core.phase("a") == states.PARKED and parker(core, "a").calls == ["park"]
    assert [q[0] for q in core.scheduler.queue] == ["a"]
    core.ready("b")                                 # b may be evicted now: it is
    assert core.phase("b") == states.UNLOADING
    assert core.phase("a") == states.PARKED
    core.exit("b")
    assert core.phase("a") == states.WAKING
    assert core.scheduler.assignments == {"a": ((0,), 60 * GiB)}


# -- pinned models ---------------------------------------------------------------------------
def test_a_pinned_model_never_parks_for_idleness_but_does_when_asked(make):
    core = make({"p": {"park": PARK, "park_after": 5, "pinned": True}})
    core.load_ready("p")
    core.loop.advance(100)
    assert core.phase("p") == states.READY and not any(p.calls for p in core.parkers.made)
    core.scheduler.park("p", core.parks.append)
    parker(core, "p").succeed()
    assert core.phase("p") == states.PARKED and core.parks == [None]


def test_park_model_of_a_model_that_cannot_park_is_refused(make):
    core = make({"a": {}})
    core.load_ready("a")
    with pytest.raises(ServiceError) as caught:
        core.scheduler.park("a", core.parks.append)
    assert caught.value.message == "model a cannot be parked: it has no park:"


# -- a daemon restart ------------------------------------------------------------------------
def adopt_into(tmp_path, pid, unit):
    core = Core({"a": {"park": PARK, "keep_alive": 60}}, tmp_path, units=True)
    core.loop.advance(1000)                         # a daemon that has run a while
    handle = FakeRunning(None, pid, lambda line: None, None, unit=unit)
    record = type("Record", (), {
        "model": "a", "unit": unit, "endpoint": "tcp://127.0.0.1:20000",
        "started_at": None, "gpus": None, "stop_timeout": 7, "definition": None,
        "ready_at": None, "protocols": None})()
    core.manager.adopt([Adoption(record, running=handle)])
    return core


def test_a_parked_model_is_adopted_parked_by_the_next_daemon(make, tmp_path):
    core = make({"a": {"park": PARK}}, units=True)
    park_ready(core, "a")
    running = core.running("a")
    recorded = json.loads((tmp_path / PARKED_FILE).read_text())
    assert recorded == {"a": {"pid": running.pid, "unit": running.unit,
                              "protocols": ["inference"]}}
    core.manager.detach_all()
    after = adopt_into(tmp_path, running.pid, running.unit)
    assert after.phase("a") == states.PARKED and after.probes.made == []
    assert after.registry.summary() == "models: 1 parked"
    after.loop.advance(59.9)                        # its keep_alive runs from the adoption
    assert after.phase("a") == states.PARKED
    after.load("a")
    assert after.phase("a") == states.WAKING


def test_a_parked_record_that_does_not_match_the_unit_is_ignored(make, tmp_path):
    core = make({"a": {"park": PARK}}, units=True)
    park_ready(core, "a")
    running = core.running("a")
    after = adopt_into(tmp_path, running.pid + 1, running.unit)     # another process
    assert after.phase("a") == states.ADOPTING and len(after.probes.made) == 1


def test_a_woken_model_is_no_longer_recorded_as_parked(make, tmp_path):
    core = make({"a": {"park": PARK}}, units=True)
    park_ready(core, "a")
    core.load("a")
    assert json.loads((tmp_path / PARKED_FILE).read_text()) == {}


def test_a_model_caught_mid_park_by_a_daemon_restart_is_stopped_by_the_next(make, tmp_path):
    """Its step ends unwatched: whether it holds its GPU memory is unknown, so the next
    daemon neither serves it (it may be asleep) nor counts it parked (it may hold memory)."""
    core = make({"a": {"park": PARK}}, units=True)
    core.load_ready("a")
    core.scheduler.park("a", core.parks.append)
    core.loop.advance(0)
    assert core.phase("a") == states.PARKING
    running = core.running("a")
    core.manager.detach_all()
    recorded = json.loads((tmp_path / PARKED_FILE).read_text())
    assert recorded == {"a": {"pid": running.pid, "unit": running.unit,
                              "in_doubt": states.PARKING}}
    after = adopt_into(tmp_path, running.pid, running.unit)
    assert after.phase("a") == states.UNLOADING and after.probes.made == []
    assert "parking" in after.registry.get("a").reason
