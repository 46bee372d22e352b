"""The status reply's text, kept between requests (Reporter.status_json), against what
status_data() encodes to, in-process over the fakes (fakes.py): the same text whatever changed
in between, so a cache that missed a change shows here."""

import dataclasses
import json

import pytest
from hypothesis import given, settings, strategies as st

from backend_mgmt.launchers.base import ExitInfo
from backend_mgmt.reporting import Reporter, seconds_text
from backend_mgmt.wire import to_json
from fakes import Core
from proptest import examples

GPUS = [{"id": 0, "memory": "80GiB"}, {"id": 1, "memory": "40GiB"}]


class FakeUsage:
    """UsageMonitor's face to the reporter: readings arrive when the test says so."""

    def __init__(self):
        self.refreshes = 0
        self.devices = None
        self.readings = {}          # name -> (pid, entry)

    def current(self):
        return {}

    def entry(self, name, pid):
        reading = self.readings.get(name)
        return reading[1] if reading is not None and reading[0] == pid else None

    def read(self, readings, devices=None):
        self.readings = readings
        self.devices = devices
        self.refreshes += 1


class FakeGuard:
    connections, budget, resets = 0, None, 0


@pytest.fixture
def setup(tmp_path):
    core = Core({"a": {}, "b": {}, "g": {"resources": {"gpus": 1, "gpu_memory": "30GiB"}}},
                tmp_path, max_loaded_models=2, gpus=GPUS)
    usage, guard = FakeUsage(), FakeGuard()
    requests = {"control": 0, "handshake": 0, "errors": 0}
    stopping = [False]
    waiting = {}
    reporter = Reporter(core.loop, core.manager, core.scheduler, usage, guard,
                        {"client": "ipc://c", "cli": "ipc://o", "events": "ipc://e"},
                        requests, None, "fake", str(tmp_path), lambda: None,
                        lambda: stopping[0], waiting)
    return core, reporter, usage, guard, requests, stopping, waiting


def encoded(data):
    """status_data() as the reply has always carried it: each model's uptime last."""
    data["models"] = [{**{k: v for k, v in model.items() if k != "uptime"},
                       "uptime": model["uptime"]} for model in data["models"]]
    return to_json(data)


def same(reporter):
    """The kept text is status_data()'s, asked twice (a fresh cache, then a kept one)."""
    expected = encoded(reporter.status_data())
    assert reporter.status_json() == expected
    assert reporter.status_json() == expected
    assert json.loads(expected) == json.loads(to_json(reporter.status_data()))


def test_the_kept_status_text_follows_every_change(setup):
    core, reporter, usage, guard, requests, stopping, waiting = setup
    same(reporter)
    core.load("a")                                   # loading
    same(reporter)
    core.loop.advance(1.2345)                        # uptimes move
    same(reporter)
    core.ready("a")
    core.loop.advance(0.0004)
    same(reporter)
    requests["control"] += 3                         # counters move per request
    guard.connections, guard.budget, guard.resets = 2, 900, 1
    same(reporter)
    core.load("g")                                   # placed on a GPU
    same(reporter)
    core.ready("g")
    core.loop.advance(7)
    same(reporter)
    usage.read({"a": (core.get("a").pid, {"memory_bytes": 5, "cpu_seconds": 0.5,
                                          "gpu_memory_bytes": None, "source": "processes",
                                          "measured_at": "t"})},
               devices={0: {"free": 1, "total": 2}})
    same(reporter)
    core.load("b")                                   # no room: queued, "a" evicted
    data = reporter.status_data()
    assert [m["state"] for m in data["models"]] == ["unloading", "ready"]
    assert data["queued"] == ["b"]
    same(reporter)
    core.exit("a", ExitInfo(signal=15))              # gone: "b" loads
    same(reporter)
    waiting["b"] = 2                                 # handshakes wait for it
    same(reporter)
    waiting.clear()
    core.ready("b")
    core.exit("b", ExitInfo(code=1))                 # a crash: restarting
    assert reporter.status_data()["counts"] == {"ready": 1, "restarting": 1}
    same(reporter)
    core.loop.advance(30)
    same(reporter)
    core.unload("g")
    core.loop.advance(0)
    same(reporter)
    stopping[0] = True
    same(reporter)
    core.manager.config = dataclasses.replace(core.manager.config, default_model="b")  # reload
    same(reporter)


def test_a_failed_model_shows_its_output(setup):
    core, reporter, *_ = setup
    core.load("a")
    core.running("a").say("CUDA error")
    core.exit("a", ExitInfo(code=3))
    core.loop.advance(100)
    same(reporter)
    assert json.loads(reporter.status_json())["models"]


@settings(max_examples=examples(3000))
@given(st.one_of(st.floats(min_value=0, max_value=1e12),
                 # exact thousandths and the halves between them: where rounding decides
                 st.integers(0, 10**9).map(lambda n: n / 1000),
                 st.integers(0, 10**9).map(lambda n: (2 * n + 1) / 2000)))
def test_a_duration_is_written_as_json_writes_it_rounded(seconds):
    assert seconds_text(seconds) == to_json(round(seconds, 3))


def test_a_duration_keeps_one_decimal_and_drops_the_zeros_after_it():
    assert [seconds_text(x) for x in (0.0, 12.0, 12.5, 0.01, 1.0005, 3.14159)] == \
        ["0.0", "12.0", "12.5", "0.01", "1.0", "3.142"]
