"""Models on demand: handshake-driven loads, idle unloads, the model budget, events."""

import datetime
import json
import os
import queue
import subprocess
import sys
import threading
import time


from harness import REPO, next_events, pid_alive, subscribe_events, wait_until


def handshakes(daemon, name, count, timeout=20):
    """``count`` concurrent handshakes for ``name``; the replies."""
    replies = [None] * count

    def one(index):
        replies[index] = daemon.handshake(name, timeout=timeout)
    threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout + 5)
    return replies


def seconds_until(iso_time):
    return datetime.datetime.fromisoformat(iso_time.replace("Z", "+00:00")).timestamp() - \
        time.time()


def test_handshake_loads_a_model_once_for_many_clients(daemon_factory):
    daemon = daemon_factory({"m": ["--startup-delay", "0.5"]})
    replies = handshakes(daemon, "m", 30)
    endpoints = {r.model_ipc_endpoint for r in replies}
    assert len(endpoints) == 1 and endpoints != {""}, [r.error_message for r in replies]
    assert all(list(r.protocols) == ["ping", "sleep"] for r in replies)
    assert len(daemon.backend_pids()) == 1
    assert daemon.model("m")["state"] == "ready"


def test_on_demand_failure_and_per_model_opt_out(daemon_factory, workdir):
    daemon = daemon_factory({"bad": ["--fail-at-start", "5"], "manual": []})
    reply = daemon.handshake("bad")
    assert "exited with code 5" in reply.error_message and not reply.model_ipc_endpoint
    assert "is failed" in daemon.handshake("bad").error_message   # not reloaded by clients
    daemon.reconfigure(lambda document: document["supported_models"][1].update(on_demand=False))
    assert "not loaded" in daemon.handshake("manual").error_message
    assert daemon.model("manual") is None


def test_handshake_timeout_does_not_cancel_the_load(daemon_factory):
    daemon = daemon_factory({"slow": ["--startup-delay", "2"]}, handshake_timeout=0.3)
    started = time.monotonic()
    reply = daemon.handshake("slow")
    assert "handshake_timeout" in reply.error_message
    assert time.monotonic() - started < 2
    wait_until(lambda: daemon.model("slow")["state"] == "ready", 10,
               message="the load to finish anyway")
    assert daemon.handshake("slow").model_ipc_endpoint


def test_keep_alive_unloads_idle_models_and_handshakes_keep_them(daemon_factory):
    daemon = daemon_factory({"m": []}, keep_alive=1.0)
    assert daemon.handshake("m").model_ipc_endpoint
    pid = daemon.model("m")["pid"]
    assert daemon.model("m")["unload_at"] is not None
    for _ in range(3):   # a handshake when the idle clock is half run down restarts it
        due = daemon.model("m")["unload_at"]
        wait_until(lambda due=due: seconds_until(due) < 0.5, 5,
                   message="half of keep_alive to pass")
        assert daemon.handshake("m").model_ipc_endpoint
        assert daemon.model("m")["unload_at"] > due          # ISO 8601 UTC: text order
    assert daemon.model("m")["pid"] == pid
    wait_until(lambda: daemon.model("m") is None, 5, message="the idle unload")
    assert not pid_alive(pid)


def test_keep_alive_zero_and_load_model_override(daemon_factory):
    daemon = daemon_factory({"m": [], "n": []}, keep_alive=0)
    assert daemon.handshake("m").model_ipc_endpoint
    wait_until(lambda: daemon.model("m") is None, 5, message="unloaded as soon as idle")
    reply = daemon.request("load-model", {"model_name": "n", "keep_alive": -1})
    assert reply["success"] and reply["data"]["model"]["unload_at"] is None
    # m, loaded after n with the daemon's keep_alive 0, goes as soon as idle; n stays.
    assert daemon.handshake("m").model_ipc_endpoint
    wait_until(lambda: daemon.model("m") is None, 5, message="m unloaded as soon as idle")
    assert daemon.model("n")["state"] == "ready"
    assert daemon.request("load-model", {"model_name": "n", "keep_alive": "x"})["code"] == \
        "bad_param"


def test_lru_eviction_skips_pinned_and_reports_evicted(daemon_factory):
    daemon = daemon_factory({"a": [], "b": [], "c": [], "d": [], "w": ["--fail-at-start", "1"]},
                            max_loaded_models=3)
    daemon.reconfigure(lambda document: document["supported_models"][0].update(pinned=True))
    sub = subscribe_events(daemon, "w")
    try:
        for name in ("a", "b", "c"):
            assert daemon.load(name)["success"]
        daemon.handshake("b")
        daemon.handshake("c")      # a, pinned, is now the least recently used; then b
        assert daemon.load("d")["success"]
        loaded = sorted(m["name"] for m in daemon.request("status")["data"]["models"])
        assert loaded == ["a", "c", "d"]
        events = next_events(sub, 5, model="b")
    finally:
        sub.close(linger=0)
    assert [e["state"] for e in events] == ["loading", "ready", "evicted", "unloading",
                                            "unloaded"]
    assert "to make room for d" in events[2]["reason"]


def test_loading_models_are_not_evicted_and_the_queue_is_bounded(daemon_factory):
    daemon = daemon_factory({"slow": ["--startup-delay", "1.5"], "b": [], "c": []},
                            max_loaded_models=1, max_queue=1)
    results = {}
    slow = threading.Thread(target=lambda: results.update(slow=daemon.load("slow")))
    slow.start()
    wait_until(lambda: daemon.model("slow"), 5)
    waiting = threading.Thread(target=lambda: results.update(b=daemon.load("b")))
    waiting.start()
    wait_until(lambda: daemon.request("status")["data"]["queued"] == ["b"], 5)
    reply = daemon.request("load-model", {"model_name": "c"})
    assert reply["code"] == "queue_full"
    slow.join(10)
    waiting.join(10)
    assert results["slow"]["success"] and results["b"]["success"]
    # b got its slot by evicting slow once slow was ready (and so idle).
    assert [m["name"] for m in daemon.request("status")["data"]["models"]] == ["b"]


def test_preload(daemon_factory):
    daemon = daemon_factory({"a": [], "b": []}, preload=["b"])
    wait_until(lambda: (m := daemon.model("b")) and m["state"] == "ready", 10)
    assert daemon.model("a") is None


def follow(daemon, *args):
    """``backend-mgmt events ARGS`` in the background; its stdout lines arrive in a queue."""
    process = subprocess.Popen(
        [sys.executable, "-m", "backend_mgmt", "events", *args, "--config", daemon.config_path],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": REPO})
    lines = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stdout],
                     daemon=True).start()
    return process, lines


def test_events_command_follows_a_lifecycle(daemon_factory):
    daemon = daemon_factory({"a": [], "w": ["--fail-at-start", "1"]})
    follower, lines = follow(daemon, "--json", "--timeout", "30")
    try:
        # Until the follower has subscribed, events are lost: load the failing w until it
        # shows one (bounded), then follow a's lifecycle.
        deadline = time.monotonic() + 15
        while lines.empty():
            assert time.monotonic() < deadline, "the follower never showed an event"
            daemon.load("w")
        daemon.load("a")
        daemon.request("unload-model", {"model_name": "a"})
        events = []
        while len(events) < 4:
            event = json.loads(lines.get(timeout=15))
            if event["model"] == "a":
                events.append(event)
    finally:
        follower.kill()
        follower.wait(5)
    assert [e["state"] for e in events] == ["loading", "ready", "unloading", "unloaded"]
    assert events[1]["endpoint"].startswith("ipc://") and events[1]["pid"]
    assert all(e["model"] == "a" and e["time"].endswith("Z") for e in events)


def test_events_command_stops_after_count(daemon_factory):
    daemon = daemon_factory({"w": ["--fail-at-start", "1"]})
    follower, lines = follow(daemon, "--count", "1", "--timeout", "30")
    try:
        deadline = time.monotonic() + 15
        while follower.poll() is None:
            assert time.monotonic() < deadline, "the follower did not stop after one event"
            daemon.load("w")
    finally:
        follower.kill()
    assert follower.wait(5) == 0
    line = lines.get(timeout=5).split()
    assert line[1] == "w" and line[2] in ("loading", "failed")   # joined before either one
    assert lines.empty()
