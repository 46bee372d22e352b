"""Parking (issue 13), the scheduler's side, in-process over the fakes: park-model's answers,
the host_memory budget (which parked model goes, an exact fit), the idle stages
(park_after, keep_alive) and waking on the GPU a model had. Expected outcomes are README's
("Parking models"); nothing sleeps.
"""

import pytest

from backend_mgmt import errors, states
from backend_mgmt.errors import ServiceError
from backend_mgmt.launchers.base import ExitInfo
from backend_mgmt.launchers.records import Adoption
from fakes import Core, FakeRunning, PARK, big, parker

GiB = 1024 ** 3
ONE_GPU = [{"id": 0, "memory": "80GiB"}]
TWO_GPUS = [{"id": 0, "memory": "80GiB"}, {"id": 1, "memory": "80GiB"}]


def sized(gib, **extra):
    """A model whose weights take ``gib`` GiB of host memory while parked (no GPU)."""
    return {"park": PARK, "resources": {"host_memory": f"{gib}GiB"}, **extra}


def park_now(core, name):
    core.scheduler.park(name, core.parks.append)
    core.loop.advance(0)
    parker(core, name).succeed()


def refusal(core, name):
    with pytest.raises(ServiceError) as caught:
        core.scheduler.park(name, core.parks.append)
    return caught.value.code, caught.value.message


# -- park-model ------------------------------------------------------------------------------
def test_park_model_refuses_a_model_not_loaded_or_not_ready_or_too_big(make):
    core = make({"a": sized(10), "huge": sized(200)}, host_memory="100GiB")
    assert refusal(core, "a") == (errors.NOT_LOADED, "model a is not loaded")
    core.load("a")                                  # loading: not ready yet
    assert refusal(core, "a") == (errors.BAD_REQUEST,
                                  "model a cannot be parked: it is not ready")
    core.load_ready("huge")
    assert refusal(core, "huge") == (
        errors.BAD_REQUEST, "model huge needs 200 GiB of host memory to park, more than "
        "host_memory 100 GiB can free")
    assert core.phase("huge") == states.READY


def test_park_model_shows_its_reason_and_answers_again_once_parked(make):
    core = make({"a": sized(10)})
    core.load_ready("a")
    core.scheduler.park("a", core.parks.append)
    assert core.phase("a") == states.PARKING and core.get("a").reason == "park-model"
    core.scheduler.park("a", core.parks.append)     # while parking: answered with the park
    assert core.parks == []
    parker(core, "a").succeed()
    assert core.parks == [None, None]
    core.scheduler.park("a", core.parks.append)     # parked already: answered at once
    assert core.parks == [None, None, None] and core.phase("a") == states.PARKED
    assert parker(core, "a").calls == ["park"]


def test_an_evicted_model_shows_why_while_it_parks(make):
    core = make({"a": big(park=PARK), "b": big()}, gpus=ONE_GPU)
    core.load_ready("a")
    core.load("b")
    assert core.phase("a") == states.PARKING
    assert core.get("a").reason == ("evicted to make room for b (GPU room); least recently "
                                    "used")


# -- the host memory budget ------------------------------------------------------------------
def test_the_least_recently_used_parked_model_is_unloaded_not_the_first_parked(make):
    core = make({"a": sized(40), "b": sized(40), "c": sized(40)}, host_memory="100GiB")
    for name in ("a", "b"):
        core.load_ready(name)
        park_now(core, name)                        # a parked first, then b: 80 of 100 GiB
    core.loop.advance(1)
    core.load("a")                                  # a used again: now b is the older
    parker(core, "a").succeed()
    park_now(core, "a")
    core.load_ready("c")
    core.scheduler.park("c", core.parks.append)     # 40 more: one parked model must go
    assert core.phase("b") == states.UNLOADING and core.phase("a") == states.PARKED


def test_host_room_is_made_by_the_parked_model_used_least_lately(make):
    """Every parked model has gone unused for a while; of two, the one used more often
    lately stays, though its last use is older. Uses fade (half-life USE_HALF_LIFE): hours
    later, one recent use outweighs several old ones."""
    from backend_mgmt.scheduler import USE_HALF_LIFE

    def race(hours_between):
        core = make({"often": sized(40), "once": sized(40), "c": sized(40)},
                    host_memory="100GiB")
        core.load_ready("often")
        for _ in range(4):                          # five uses in all
            core.loop.advance(1)
            core.load("often")
        park_now(core, "often")
        core.loop.advance(hours_between * 3600)
        core.load_ready("once")                     # one use, more recent
        park_now(core, "once")
        core.loop.advance(1)
        core.load_ready("c")
        core.scheduler.park("c", core.parks.append)     # 40 more: one parked model must go
        return core.phase("often"), core.phase("once")
    assert USE_HALF_LIFE == 3600
    assert race(0.5) == (states.PARKED, states.UNLOADING)      # 5 x 0.7 > 1
    assert race(3) == (states.UNLOADING, states.PARKED)        # 5 / 8 < 1


def test_the_parked_model_waiting_to_wake_is_not_unloaded_to_park_the_one_it_displaces(make):
    """Waking a needs b's GPU; b's weights fit host_memory only if a parked model goes, and a
    is the only parked model. Unloading a would turn its wake into a cold
    load (and b's park into waste): b is unloaded instead, and a wakes. (The trace benchmark
    paid 5% of its load seconds for this.)"""
    core = make({"a": big(park=PARK), "b": big(park=PARK)}, gpus=ONE_GPU,
                host_memory="100GiB")
    core.load_ready("a")
    park_now(core, "a")                             # 60 of 100 GiB
    core.load_ready("b")
    core.load("a")                                  # b must leave GPU 0; 60 more won't fit
    assert core.phase("a") == states.PARKED and core.phase("b") == states.UNLOADING
    core.exit("b", ExitInfo(code=0))
    core.loop.advance(0)
    assert core.phase("a") == states.WAKING and parker(core, "a").calls == ["park", "wake"]


def test_weights_that_fit_beside_the_parked_ones_unload_none(make):
    core = make({"a": sized(60), "b": sized(40)}, host_memory="100GiB")
    core.load_ready("a")
    park_now(core, "a")
    core.load_ready("b")
    park_now(core, "b")                             # 60 + 40: exactly the budget
    assert core.phase("a") == states.PARKED and core.phase("b") == states.PARKED
    assert core.scheduler.parked_host == {"a": 60 * GiB, "b": 40 * GiB}


def test_unloading_a_parked_model_frees_the_budget_left_plus_its_weights(make):
    core = make({"a": sized(50), "b": sized(60)}, host_memory="100GiB")
    core.load_ready("a")
    park_now(core, "a")                             # 50 free; b needs 60: a must go
    core.load_ready("b")
    core.scheduler.park("b", core.parks.append)
    assert core.phase("a") == states.UNLOADING and core.phase("b") == states.PARKING


def adopted_parked(tmp_path, models, name, later=None, **settings):
    """A daemon (with config ``later``, if given) that adopts ``name`` parked, as the
    previous one left it."""
    core = Core(models, tmp_path, units=True, **settings)
    core.load_ready(name)
    park_now(core, name)
    running = core.running(name)
    core.manager.detach_all()
    after = Core(later or models, tmp_path, units=True, **settings)
    handle = FakeRunning(None, running.pid, lambda line: None, None, unit=running.unit)
    record = type("Record", (), {
        "model": name, "unit": running.unit, "endpoint": "tcp://127.0.0.1:20000",
        "started_at": None, "gpus": None, "stop_timeout": 7, "definition": None,
        "ready_at": None, "protocols": None})()
    after.manager.adopt([Adoption(record, running=handle)])
    assert after.phase(name) == states.PARKED
    return after


def test_a_model_adopted_parked_takes_its_host_memory(tmp_path):
    after = adopted_parked(tmp_path, {"a": sized(60), "b": sized(60)}, "a",
                           host_memory="100GiB")
    assert after.scheduler.parked_host == {"a": 60 * GiB}
    after.load_ready("b")
    after.scheduler.park("b", after.parks.append)   # 60 + 60 do not fit: a goes
    assert after.phase("a") == states.UNLOADING


def test_a_model_adopted_parked_with_keep_alive_0_is_unloaded_at_once(tmp_path):
    after = adopted_parked(tmp_path, {"a": sized(1)}, "a", later={"a": sized(1, keep_alive=0)})
    after.loop.advance(0)
    assert after.phase("a") == states.UNLOADING


def test_a_parked_model_frees_its_slot_for_the_next_eviction(make):
    core = make({"a": sized(1), "b": sized(1), "c": {}}, max_loaded_models=1)
    core.load_ready("a")
    core.load("b")                                  # a evicted: parked
    parker(core, "a").succeed()
    core.ready("b")
    core.load("c")                                  # b must go now
    assert core.phase("b") == states.PARKING


# -- idleness --------------------------------------------------------------------------------
def test_an_idle_park_that_does_not_fit_host_memory_waits_for_keep_alive(make):
    core = make({"a": sized(200, park_after=10, keep_alive=60)}, host_memory="100GiB")
    core.load_ready("a")
    core.loop.advance(10)
    assert core.phase("a") == states.READY and parker(core, "a").calls == []
    core.loop.advance(49.9)
    assert core.phase("a") == states.READY
    core.loop.advance(0.1)
    assert core.phase("a") == states.UNLOADING
    assert core.get("a").reason == "idle for 60.0 s (keep_alive 60 s)"


def test_park_after_without_park_only_unloads_at_keep_alive(make):
    core = make({"a": {"park_after": 10, "keep_alive": 60}})
    core.load_ready("a")
    core.loop.advance(59.9)
    assert core.phase("a") == states.READY
    core.loop.advance(0.1)
    assert core.phase("a") == states.UNLOADING


def test_park_after_shortly_before_keep_alive_still_parks(make):
    core = make({"a": sized(1, park_after=10, keep_alive=10.5)})
    core.load_ready("a")
    core.loop.advance(10)
    assert core.phase("a") == states.PARKING
    parker(core, "a").succeed()
    core.loop.advance(0.5)
    assert core.phase("a") == states.UNLOADING


def test_a_parked_model_with_a_short_keep_alive_is_unloaded_after_it(make):
    core = make({"a": sized(1, keep_alive=0.5)})
    core.load_ready("a")
    park_now(core, "a")
    core.loop.advance(0.4)
    assert core.phase("a") == states.PARKED
    core.loop.advance(0.1)
    assert core.phase("a") == states.UNLOADING


# -- waking on its own GPU -------------------------------------------------------------------
def test_a_queued_wake_does_not_take_another_gpu_that_frees(make):
    core = make({"a": big(park=PARK), "b": big(), "c": big()}, gpus=TWO_GPUS)
    core.load_ready("a")
    park_now(core, "a")                             # it ran on GPU 0
    core.load("b")                                  # GPU 0, still loading: not evictable
    core.load_ready("c")                            # GPU 1
    core.load("a")
    assert [q[0] for q in core.scheduler.queue] == ["a"]
    core.unload("c")
    core.exit("c", ExitInfo(code=0))                # GPU 1 free, GPU 0 still b's
    assert core.phase("a") == states.PARKED and parker(core, "a").calls == ["park"]
    assert [q[0] for q in core.scheduler.queue] == ["a"]


def test_a_parked_model_wakes_when_its_gpu_has_exactly_its_need_free(make):
    core = make({"a": big(park=PARK), "s": {"resources": {"gpus": 1, "gpu_memory": "20GiB"}}},
                gpus=ONE_GPU)
    core.load_ready("a")
    park_now(core, "a")
    core.load_ready("s")                            # 20 of 80 GiB: 60 left, a's need
    core.load("a")
    assert core.phase("a") == states.WAKING and core.phase("s") == states.READY


def test_a_parked_model_placed_by_gpu_count_wakes_on_its_free_gpu(make):
    core = make({"a": {"park": PARK, "resources": {"gpus": 1}}}, gpus=TWO_GPUS)
    core.load_ready("a")
    devices = core.get("a").gpu_devices
    park_now(core, "a")
    core.load("a")
    assert core.phase("a") == states.WAKING and core.scheduler.assignments["a"].devices == \
        devices


def test_the_next_queued_load_gets_room_made_when_the_one_before_it_starts(make):
    """README: when room is needed the least recently used idle model is evicted; that is
    not put off until the load started before it is ready."""
    core = make({"x": {"resources": {"gpus": 1, "gpu_memory": "20GiB"}}, "a": big(),
                 "b": big(), "c": {"resources": {"gpus": 1, "gpu_memory": "20GiB"}}},
                gpus=ONE_GPU)
    core.load_ready("x")
    core.load_ready("a")
    core.load("b")                                  # a evicted for b
    core.load("c")                                  # waits behind b
    assert core.phase("a") == states.UNLOADING and core.phase("x") == states.READY
    core.exit("a")
    assert core.phase("b") == states.LOADING
    assert core.phase("x") == states.UNLOADING      # for c, while b still loads
