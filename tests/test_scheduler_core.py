"""The scheduler's decisions, in-process over the fakes (fakes.py): the model budget, LRU
eviction, the queue, GPU placement, idle unloads. Expected outcomes are README's ("On-demand
loading and the model budget", "GPUs", the config table); nothing sleeps.
"""

import dataclasses
import types

import pytest

from backend_mgmt import errors, states
from backend_mgmt.errors import ServiceError
from backend_mgmt.launchers.base import ExitInfo
from backend_mgmt.launchers.records import Adoption
from backend_mgmt.placement import Assignment
from fakes import WALL_START, FakeRunning

GiB = 1024 ** 3


def error_of(core, name):
    return [error for n, _, error in core.answers if n == name][-1]


def refused(core, name, **kw):
    with pytest.raises(ServiceError) as caught:
        core.load(name, **kw)
    return caught.value


# -- the model budget ------------------------------------------------------------------------
def test_loads_within_the_budget_start_at_once(make):
    core = make({"a": {}, "b": {}}, max_loaded_models=2)
    core.load("a")
    core.load("b")
    assert core.get("a").state == core.get("b").state == "loading"
    assert list(core.scheduler.queue) == []


def test_one_more_evicts_the_least_recently_used_ready_model(make):
    core = make({"a": {}, "b": {}, "c": {}}, max_loaded_models=2)
    core.load_ready("a")
    core.loop.advance(1)
    core.load_ready("b")
    core.loop.advance(1)
    core.scheduler.touch(core.get("a"))            # a handshake for a: b is now the older
    core.load("c")
    assert [n for n, _ in core.evicted] == ["b"]
    assert core.evicted[0][1] == ("evicted to make room for c (max_loaded_models 2); least "
                                  "recently used")
    assert core.get("b").state == "unloading" and core.get("c") is None
    assert [name for name, _, _ in core.scheduler.queue] == ["c"]
    assert core.get("b").reason == core.evicted[0][1] and core.published == ["evicted"]
    core.exit("b")                                 # starts once the victim's process is gone
    assert core.get("b") is None and core.get("c").state == "loading"
    assert core.get("a").state == "ready"


def test_never_evicts_a_pinned_or_loading_model_the_load_queues(make):
    core = make({"p": {"pinned": True}, "l": {}, "n": {}}, max_loaded_models=2, max_queue=1)
    core.load_ready("p")
    core.load("l")                                 # still loading
    core.load("n")
    assert core.evicted == [] and [q[0] for q in core.scheduler.queue] == ["n"]
    error = refused(core, "n")
    assert error.code == errors.QUEUE_FULL
    assert error.message == ("2 models loaded (max_loaded_models 2), none can be evicted, and "
                             "1 loads are already waiting (max_queue)")
    core.ready("l")                                # ready now: it may be evicted
    assert [n for n, _ in core.evicted] == ["l"]
    core.exit("l")
    assert core.get("n").state == "loading"


def test_restarting_and_unloading_models_hold_their_slot(make):
    core = make({"a": {}, "b": {}}, max_loaded_models=1, max_queue=0)
    core.load_ready("a")
    core.exit("a", ExitInfo(code=1))
    assert core.get("a").state == "restarting"
    assert refused(core, "b").code == errors.QUEUE_FULL


def test_a_failed_model_frees_its_slot(make):
    core = make({"a": {}, "b": {}}, max_loaded_models=1)
    core.load("a")
    core.exit("a", ExitInfo(code=1))               # failed at start-up
    core.load("b")
    assert core.get("b").state == "loading"


def test_queued_loads_start_in_order_as_slots_free(make):
    core = make({"a": {"pinned": True}, "b": {}, "c": {}}, max_loaded_models=1)
    core.load_ready("a")
    core.load("b")
    core.load("c")
    assert [q[0] for q in core.scheduler.queue] == ["b", "c"]
    core.unload("a")
    core.exit("a")
    assert core.get("b").state == "loading" and core.get("c") is None
    assert [q[0] for q in core.scheduler.queue] == ["c"]


def test_a_load_of_a_model_being_unloaded_waits_for_its_exit(make):
    core = make({"a": {}}, max_loaded_models=1)
    core.load_ready("a")
    core.unload("a")
    core.load("a")
    assert [q[0] for q in core.scheduler.queue] == ["a"]
    assert len(core.launcher.started) == 1
    core.exit("a")
    assert core.get("a").state == "loading" and len(core.launcher.started) == 2


def test_a_load_waiting_for_its_unload_is_not_started_by_another_exit(make):
    core = make({"a": {}, "b": {}})                # no budget: only its own unload holds it
    core.load_ready("a")
    core.load_ready("b")
    core.unload("a")
    core.load("a")
    core.unload("b")
    core.exit("b")                                 # room frees, but a is still unloading
    assert [q[0] for q in core.scheduler.queue] == ["a"] and error_of(core, "a") is None
    core.exit("a")
    assert core.get("a").state == "loading" and list(core.scheduler.queue) == []


def test_a_ready_model_answers_at_once_and_a_loading_one_is_joined(make):
    core = make({"a": {}}, max_loaded_models=1, max_queue=0)
    core.load("a")
    core.load("a")
    core.ready("a")
    core.load("a")
    assert [error for _, _, error in core.answers] == [None, None, None]
    assert len(core.launcher.started) == 1


def test_cancel_queued_answers_every_waiting_load(make):
    core = make({"a": {"pinned": True}, "b": {}}, max_loaded_models=1)
    core.load_ready("a")
    core.load("b")
    core.scheduler.cancel_queued(ServiceError(errors.SHUTTING_DOWN, "stopping"))
    assert error_of(core, "b").code == errors.SHUTTING_DOWN
    assert list(core.scheduler.queue) == []


def test_a_queued_model_removed_from_the_config_is_answered(make):
    core = make({"a": {"pinned": True}, "b": {}}, max_loaded_models=1)
    core.load_ready("a")
    core.load("b")
    del core.manager.config.models["b"]
    core.unload("a")
    core.exit("a")
    assert error_of(core, "b").code == errors.UNKNOWN_MODEL


def test_unknown_model_is_refused(make):
    core = make({"a": {}})
    assert refused(core, "zzz").code == errors.UNKNOWN_MODEL


# -- GPUs ------------------------------------------------------------------------------------
GPUS = [{"id": 0, "memory": "80GiB"}, {"id": 1, "memory": "40GiB"}]


def test_a_gpu_model_is_placed_best_fit_and_told_its_devices(make):
    core = make({"g": {"resources": {"gpus": 1, "gpu_memory": "30GiB"}}}, gpus=GPUS)
    core.load("g")
    assert core.scheduler.assignments == {"g": Assignment((1,), 30 * GiB)}   # least free fits
    assert core.launcher.last.launch.env["CUDA_VISIBLE_DEVICES"] == "1"
    assert core.get("g").as_status()["gpus"] == [1]


def test_gpu_memory_is_freed_when_the_model_fails_or_is_unloaded(make):
    core = make({"g": {"resources": {"gpus": 1, "gpu_memory": "30GiB"}}}, gpus=GPUS)
    core.load("g")
    core.exit("g", ExitInfo(code=1))
    assert core.scheduler.assignments == {}
    core.load_ready("g")
    core.unload("g")
    assert "g" in core.scheduler.assignments        # held until the process is gone
    core.exit("g")
    assert core.scheduler.assignments == {}


def test_no_gpu_room_evicts_an_idle_model_holding_it(make):
    core = make({"a": {"resources": {"gpus": 2}}, "b": {"resources": {"gpus": 1}}},
                gpus=GPUS)
    core.load_ready("a")
    core.load("b")
    assert [n for n, _ in core.evicted] == ["a"]
    assert "(GPU room)" in core.evicted[0][1]
    core.exit("a")
    assert core.get("b").state == "loading"
    assert core.scheduler.assignments["b"].devices in ((0,), (1,))


def test_a_need_no_gpu_can_meet_is_refused(make):
    # check-config refuses such a model; the scheduler still never queues one for ever.
    core = make({"g": {"resources": {"gpus": 1}}}, gpus=GPUS)
    spec = core.manager.config.models["g"]
    core.manager.config.models["g"] = dataclasses.replace(
        spec, resources=dataclasses.replace(spec.resources, gpu_memory=100 * GiB))
    error = refused(core, "g")
    assert error.code == errors.GPU_UNAVAILABLE
    assert error.message.startswith("model g needs 100 GiB")


def test_a_restart_keeps_its_devices(make):
    core = make({"g": {"resources": {"gpus": 1}}}, gpus=GPUS)
    core.load_ready("g")
    devices = core.scheduler.assignments["g"]
    core.exit("g", ExitInfo(code=1))
    assert core.scheduler.assignments["g"] == devices
    core.loop.advance(1)
    assert core.launcher.last.launch.env["CUDA_VISIBLE_DEVICES"] == \
        ",".join(str(d) for d in devices.devices)


def test_an_adopted_unit_takes_its_devices_back(make):
    core = make({"g": {"resources": {"gpus": 1}}}, gpus=GPUS)
    record = types.SimpleNamespace(model="g", unit="u.service", endpoint="tcp://127.0.0.1:9",
                                   started_at=WALL_START, gpus="0", stop_timeout=1,
                                   definition=None)
    handle = FakeRunning(None, 7, None, None, unit="u.service")
    core.manager.adopt([Adoption(record, running=handle)])
    assert core.scheduler.assignments["g"].devices == (0,)


# -- idle unloads ----------------------------------------------------------------------------
def test_keep_alive_unloads_a_model_idle_that_long(make):
    core = make({"a": {"keep_alive": 10}})
    core.load_ready("a")
    assert core.scheduler.unload_at(core.get("a")) == WALL_START + 10
    core.loop.advance(6)
    core.scheduler.touch(core.get("a"))             # a handshake restarts the idle clock
    assert core.scheduler.unload_at(core.get("a")) == WALL_START + 16
    core.loop.advance(9.9)
    assert core.get("a").state == "ready"
    core.loop.advance(0.1)
    assert core.get("a").state == "unloading"
    assert core.get("a").reason == "idle for 10.0 s (keep_alive 10 s)"
    core.exit("a")
    assert core.get("a") is None


def test_one_idle_timer_per_model_however_many_uses(make):
    core = make({"a": {"keep_alive": 10}})
    core.load_ready("a")
    for _ in range(5):
        core.scheduler.touch(core.get("a"))
    assert len(core.loop.pending()) == 1


def test_the_idle_clock_runs_from_readiness(make):
    core = make({"a": {"keep_alive": 10}})
    core.load("a")
    core.loop.advance(25)                           # a slow load is not idleness
    core.ready("a")
    core.loop.advance(9)
    assert core.get("a").state == "ready"
    core.loop.advance(1)
    assert core.get("a").state == "unloading"


def test_keep_alive_override_of_load_model(make):
    core = make({"a": {"keep_alive": 10}, "b": {}})
    core.load_ready("a", keep_alive=2)
    assert core.scheduler.keep_alive(core.get("a")) == 2
    core.loop.advance(2)
    assert core.get("a").state == "unloading"
    core.load_ready("b", keep_alive=3)              # -1 (forever) overridden
    core.load("b")                                  # a join without one keeps it
    assert core.scheduler.keep_alive(core.get("b")) == 3
    core.load("b", keep_alive=4)                    # a join with one sets it
    assert core.scheduler.keep_alive(core.get("b")) == 4
    core.load("b", keep_alive=-1)
    assert core.scheduler.keep_alive(core.get("b")) == -1
    core.loop.advance(100)
    assert core.get("b").state == "ready"


def test_the_override_lasts_for_that_load_only(make):
    core = make({"a": {"keep_alive": 10}})
    core.load_ready("a", keep_alive=100)
    core.unload("a")
    core.exit("a")
    core.load_ready("a")
    assert core.scheduler.keep_alive(core.get("a")) == 10


def test_pinned_and_forever_models_are_never_idle_unloaded(make):
    core = make({"p": {"keep_alive": 1, "pinned": True}, "f": {}})
    core.load_ready("p")
    core.load_ready("f")
    core.loop.advance(1000)
    assert core.get("p").state == core.get("f").state == "ready"
    assert core.scheduler.unload_at(core.get("p")) is None
    assert core.scheduler.unload_at(core.get("f")) is None


def test_keep_alive_zero_unloads_as_soon_as_idle(make):
    core = make({"a": {"keep_alive": 0}})
    core.load_ready("a")
    assert core.get("a").state == "unloading"


def test_no_unload_at_unless_ready(make):
    core = make({"a": {"keep_alive": 5}})
    core.load("a")
    assert core.scheduler.unload_at(core.get("a")) is None


def test_a_hung_model_being_stopped_is_not_idle_unloaded(make):
    core = make({"a": {"keep_alive": 5, "liveness": {"interval": 1}}})
    core.load_ready("a")
    core.liveness.last.hang("no pong")
    core.loop.advance(10)
    assert core.get("a").phase == states.STOPPING_HUNG


def test_a_touch_shows_in_the_status_entry(make):
    core = make({"a": {"keep_alive": 5}})
    core.load_ready("a")
    version = core.get("a").version
    core.loop.advance(1)
    core.scheduler.touch(core.get("a"))
    assert core.get("a").version != version         # status re-encodes its unload_at


def test_the_scheduler_forgets_an_unloaded_model(make):
    core = make({"a": {"keep_alive": 5}})
    core.load_ready("a")
    backend = core.get("a")
    core.unload("a")
    core.exit("a")
    assert backend not in core.scheduler.uses and core.loop.pending() == []


def test_loads_waiting_are_logged(make, caplog):
    caplog.set_level("INFO", logger="backend_mgmt.scheduler")
    core = make({"a": {"pinned": True}, "b": {}}, max_loaded_models=1)
    core.load_ready("a")
    core.load("b")
    core.unload("a")
    core.load("a")
    assert [r.getMessage() for r in caplog.records if r.name == "backend_mgmt.scheduler"] == [
        "model b: waiting for room (1 loaded, max_loaded_models 1)",
        "model a: load waits for its unload to finish"]


def test_evicts_no_more_than_the_queue_needs(make):
    core = make({"a": {}, "b": {}, "c": {}, "d": {}, "e": {}}, max_loaded_models=3)
    for name in "abc":
        core.load_ready(name)
        core.loop.advance(1)
    core.load("d")
    core.load("e")
    assert [n for n, _ in core.evicted] == ["a", "b"]


def test_a_load_waiting_for_its_own_unload_evicts_nothing(make):
    core = make({"a": {}, "b": {}, "c": {}}, max_loaded_models=4)
    core.load_ready("a")
    core.load_ready("b")
    core.unload("a")
    core.load("a")
    core.load_ready("c")                           # a READY with a load queued: room is checked
    assert core.evicted == []


def test_a_queued_load_keeps_its_keep_alive_and_is_answered(make):
    core = make({"a": {"pinned": True}, "b": {}}, max_loaded_models=1)
    core.load_ready("a")
    core.load("b", keep_alive=5)
    core.unload("a")
    core.exit("a")
    core.ready("b")
    assert core.scheduler.keep_alive(core.get("b")) == 5
    assert core.answers[-1] == ("b", core.get("b"), None)


def test_a_model_needing_gpu_memory_only_gets_one_device(make):
    core = make({"g": {"resources": {"gpu_memory": "50GiB"}}}, gpus=GPUS)
    core.load("g")
    assert core.scheduler.assignments == {"g": Assignment((0,), 50 * GiB)}


def test_unload_at_with_a_short_keep_alive(make):
    core = make({"a": {"keep_alive": 0.5}, "z": {"keep_alive": 0}})
    for name in "az":
        core.load(name)
        core.probes.made[-1].answer()               # ready, the loop not run yet
    assert core.scheduler.unload_at(core.get("a")) == WALL_START + 0.5
    assert core.scheduler.unload_at(core.get("z")) == WALL_START


def test_a_model_kept_forever_has_no_idle_timer(make):
    core = make({"f": {}})
    core.load_ready("f")
    assert core.loop.pending() == []


def test_an_idle_check_that_comes_early_waits_out_the_rest(make):
    # The loop brings a far timer in (loop.MAX_TIMER_DELAY); the check must not unload early.
    core = make({"a": {"keep_alive": 10}})
    core.load_ready("a")
    core.loop.advance(9.5)
    core.scheduler._idle_check(core.get("a"))
    assert core.get("a").state == "ready"
    core.loop.advance(0.5)
    assert core.get("a").state == "unloading"


# -- the scheduler's records, more ---------------------------------------------------------------
def adopt_on_device_1(core, model):
    """A running unit of ``model`` that a previous daemon placed on GPU 1, adopted."""
    record = types.SimpleNamespace(model=model, unit="u.service", endpoint="tcp://127.0.0.1:9",
                                   started_at=WALL_START, gpus="1", stop_timeout=1,
                                   definition=None, ready_at=None, protocols=None)
    handle = FakeRunning(None, 7, None, None, unit="u.service")
    core.manager.adopt([Adoption(record, running=handle)])


def test_an_adopted_unit_takes_back_the_memory_its_model_needs(make):
    core = make({"g": {"resources": {"gpus": 1, "gpu_memory": "30GiB"}}}, gpus=GPUS)
    adopt_on_device_1(core, "g")
    assert core.scheduler.assignments["g"] == Assignment((1,), 30 * GiB)


def test_an_adopted_unit_of_a_memory_only_model_takes_its_device_back(make):
    """gpu_memory without a count asks for one device: the unit a previous daemon placed
    keeps it, or the same memory could be handed out twice."""
    core = make({"g": {"resources": {"gpu_memory": "30GiB"}}}, gpus=GPUS)
    adopt_on_device_1(core, "g")
    assert core.scheduler.assignments["g"] == Assignment((1,), 30 * GiB)


def test_a_model_without_gpus_holds_no_devices(make):
    core = make({"a": {}})
    core.load_ready("a")
    core.exit("a", ExitInfo(code=1))
    core.load("a")
    assert core.scheduler.assignments == {}


def test_a_failed_model_s_idle_timer_is_cancelled(make):
    core = make({"a": {"keep_alive": 10, "restart": {"policy": "no"}}})
    core.load_ready("a")
    core.exit("a", ExitInfo(code=1))
    assert core.get("a").state == "failed" and core.loop.pending() == []


def test_an_evicted_model_loaded_again_can_be_evicted_again(make):
    core = make({"a": {}, "b": {}}, max_loaded_models=1)
    core.load_ready("a")
    core.load("b")                                  # evicts a
    core.exit("a")
    core.ready("b")
    core.load("a")                                  # evicts b: a is no longer being evicted
    assert [n for n, _ in core.evicted] == ["a", "b"]
    core.exit("b")
    assert core.get("a").state == "loading"
