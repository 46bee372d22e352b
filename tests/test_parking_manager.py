"""Parking in the manager, in-process over the fakes (fakes.py): what parked.json holds and
which of its records a new daemon trusts (hostile input), the reasons status shows, and what
failures answer. Expected outcomes are README's ("Parking models"); nothing sleeps.
"""

import json
import os

import pytest

from backend_mgmt import errors, states
from backend_mgmt.errors import ServiceError
from backend_mgmt.launchers.base import ExitInfo
from backend_mgmt.launchers.records import Adoption
from backend_mgmt.manager import PARKED_FILE
from fakes import Core, FakeRunning, PARK, WALL_START, parker

CRASH = ExitInfo(code=1)
PID, UNIT = 4242, "backend-a-4242.service"


def park(core, name):
    core.scheduler.park(name, core.parks.append)
    core.loop.advance(0)


def park_ready(core, name):
    core.load_ready(name)
    park(core, name)
    parker(core, name).succeed()


def unit_of(model, pid=PID):
    handle = FakeRunning(None, pid, lambda line: None, None, unit=f"backend-{model}-{pid}.service")
    record = type("Record", (), {
        "model": model, "unit": handle.unit, "endpoint": "tcp://127.0.0.1:20000",
        "started_at": None, "gpus": None, "stop_timeout": 7, "definition": None,
        "ready_at": None, "protocols": None})()
    return Adoption(record, running=handle)


def adopt(tmp_path, parked, models=None, found=("a",)):
    """A new daemon adopting units of ``found`` with ``parked`` as parked.json (a document,
    or raw bytes)."""
    (tmp_path / PARKED_FILE).write_bytes(
        parked if isinstance(parked, bytes) else json.dumps(parked).encode())
    core = Core(models or {"a": {"park": PARK}}, tmp_path, units=True)
    core.loop.advance(1000)
    adoptions = [unit_of(name, PID + number) for number, name in enumerate(found)]
    core.manager.adopt(adoptions)
    return core, [a.running for a in adoptions]


# -- what parked.json holds --------------------------------------------------------------------
def test_parked_json_is_the_daemons_own(make, tmp_path):
    core = make({"a": {"park": PARK}}, units=True)
    park_ready(core, "a")
    assert os.stat(tmp_path / PARKED_FILE).st_mode & 0o777 == 0o600


# -- which records a new daemon trusts -------------------------------------------------------
def test_an_adopted_parked_model_keeps_its_protocols_and_shows_when_it_was_parked(tmp_path):
    core, _ = adopt(tmp_path, {"a": {"pid": PID, "unit": UNIT,
                                     "protocols": ["inference", "sleep"]}})
    backend = core.get("a")
    assert backend.phase == states.PARKED
    assert backend.protocols == ["inference", "sleep"]      # what clients will be told
    assert backend.parked_at == WALL_START + 1000
    assert UNIT in backend.reason and "parked" in backend.reason
    core.load("a")
    parker(core, "a").succeed()
    assert core.phase("a") == states.READY and backend.protocols == ["inference", "sleep"]


@pytest.mark.parametrize("protocols", [None, [1], "inference", {"inference": 1}])
def test_protocols_of_another_shape_are_not_taken(tmp_path, protocols):
    core, _ = adopt(tmp_path, {"a": {"pid": PID, "unit": UNIT, "protocols": protocols}})
    assert core.phase("a") == states.PARKED and core.get("a").protocols == []


@pytest.mark.parametrize("entry", [
    [PID, UNIT], "parked", None, {"unit": UNIT}, {"pid": PID}, {"pid": str(PID), "unit": UNIT},
    {"pid": PID, "unit": None}, {"pid": PID + 1, "unit": UNIT},
    {"pid": PID, "unit": "backend-a-1.service"}])
def test_a_record_that_is_not_the_units_own_is_ignored(tmp_path, entry):
    core, _ = adopt(tmp_path, {"a": entry})
    assert core.phase("a") == states.ADOPTING and len(core.probes.made) == 1


@pytest.mark.parametrize("document", [b"[]", b"not json", b"\xff\xfe", b'"a"'])
def test_a_parked_file_of_another_shape_is_ignored(tmp_path, document):
    core, _ = adopt(tmp_path, document)
    assert core.phase("a") == states.ADOPTING and len(core.probes.made) == 1


def test_a_parked_file_over_a_mebibyte_is_not_read(tmp_path):
    padding = {f"x{n}": {"pid": n, "unit": "u" * 50} for n in range(20000)}
    document = json.dumps({"a": {"pid": PID, "unit": UNIT}, **padding}).encode()
    assert 1 << 20 < len(document) < 2 << 20
    core, _ = adopt(tmp_path, document)
    assert core.phase("a") == states.ADOPTING


def test_a_unit_in_doubt_is_stopped_and_the_others_still_adopted(tmp_path):
    core, (first, second) = adopt(
        tmp_path, {"a": {"pid": PID, "unit": UNIT, "in_doubt": states.WAKING}},
        models={"a": {"park": PARK}, "b": {}}, found=("a", "b"))
    assert core.phase("a") == states.UNLOADING and first.stops == [10.0]
    assert core.get("a").reason.startswith("the previous daemon restarted while it was waking")
    assert core.phase("b") == states.ADOPTING
    first.exit()
    core.loop.advance(0)
    assert core.get("a") is None


# -- reasons and answers -----------------------------------------------------------------------
def test_park_and_wake_reasons_say_how_long_they_took(make):
    core = make({"a": {"park": PARK}})
    core.load_ready("a")
    core.loop.advance(100)
    park(core, "a")
    core.loop.advance(2)
    parker(core, "a").succeed()
    backend = core.get("a")
    assert backend.reason == "parked in 2.0 s (park-model)"
    assert backend.parked_at == WALL_START + 102
    assert backend.as_status()["parked_at"] is not None
    core.loop.advance(50)
    core.load("a")
    assert backend.phase == states.WAKING and backend.reason == "woken for a load"
    core.loop.advance(3)
    parker(core, "a").succeed()
    assert backend.reason == "woke in 3.0 s"
    assert backend.as_status()["parked_at"] is None


def test_park_model_calls_during_a_park_are_all_answered(make):
    core = make({"a": {"park": PARK}})
    core.load_ready("a")
    park(core, "a")
    park(core, "a")
    parker(core, "a").succeed()
    assert core.parks == [None, None]


def test_a_failed_park_is_told_to_park_model_and_shown_as_the_error(make):
    core = make({"a": {"park": PARK}})
    core.load_ready("a")
    park(core, "a")
    parker(core, "a").fail("cuda-checkpoint exited with 2")
    message = "park failed: cuda-checkpoint exited with 2; unloading it"
    assert core.parks == [message]
    assert core.get("a").as_status()["error"] == message


def test_a_process_that_ends_while_parking_is_told_to_park_model(make):
    core = make({"a": {"park": PARK}})
    core.load_ready("a")
    park(core, "a")
    core.exit("a", CRASH)
    assert core.parks == ["backend exited with code 1 while parking"]
    assert core.get("a") is None


def test_a_process_that_ends_while_waking_says_so(make):
    core = make({"a": {"park": PARK, "restart": {"backoff_initial": 1}}})
    park_ready(core, "a")
    core.load("a")
    core.exit("a", CRASH)
    assert core.get("a").reason == "backend exited with code 1 while waking; restarting in 1 s"


def test_a_failed_wake_answers_the_loads_and_stops_the_backend(make):
    core = make({"a": {"park": PARK, "stop_timeout": 7}})
    park_ready(core, "a")
    core.load("a")
    parker(core, "a").fail("no GPU")
    message = "wake failed: no GPU; stopping it to restart it cold"
    [error] = [e for n, _, e in core.answers if n == "a" and e is not None]
    assert (error.code, error.message, error.data) == (errors.LOAD_FAILED, message,
                                                       {"model": "a"})
    assert core.running("a").stops == [7.0]
    assert core.get("a").as_status()["parked_at"] is None


def test_a_parked_unit_whose_model_lost_park_is_restarted_cold_when_wanted(tmp_path):
    core, (handle,) = adopt(tmp_path, {"a": {"pid": PID, "unit": UNIT}}, models={"a": {}})
    assert core.phase("a") == states.PARKED
    core.load("a")
    message = ("wake failed: no way to wake it (park: gone from its model?); stopping it to "
               "restart it cold")
    assert core.phase("a") == states.STOPPING_STALLED and core.get("a").reason == message
    assert handle.stops == [10.0]


# -- refusals of the manager's own calls -------------------------------------------------------
def test_parking_what_cannot_park_is_refused(make):
    core = make({"a": {"park": PARK}, "b": {}})
    core.load("a")
    core.load_ready("b")
    for name, why in (("a", "it is not ready"), ("b", "it has no park:")):
        with pytest.raises(ServiceError) as caught:
            core.manager.park_backend(core.get(name), core.parks.append, "park-model")
        assert (caught.value.code, caught.value.message) == (
            errors.BAD_REQUEST, f"model {name} cannot be parked: {why}")


def test_loading_a_model_being_parked_is_refused_by_the_manager(make):
    """The scheduler queues such a load until the park ends; the manager refuses it."""
    core = make({"a": {"park": PARK}})
    core.load_ready("a")
    park(core, "a")
    with pytest.raises(ServiceError) as caught:
        core.manager.load("a", lambda backend, error: None)
    assert (caught.value.code, caught.value.message) == (
        errors.BAD_REQUEST, "model a is being parked; load it again once it is parked")


def test_nothing_of_an_ended_process_is_kept(make):
    """A daemon runs for months: the Parker of a process that ended is dropped with it."""
    core = make({"a": {"park": PARK}})
    park_ready(core, "a")
    core.unload("a")
    core.exit("a")
    assert core.get("a") is None and core.manager._parkers == {}
