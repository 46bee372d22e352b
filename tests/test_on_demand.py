"""Models on demand: handshake-driven loads, idle unloads, the model budget, events."""

import json
import subprocess
import sys
import threading
import time

import zmq

from harness import REFERENCE, REPO, pid_alive, wait_until


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


def test_handshake_loads_a_model_once_for_many_clients(daemon_factory):
    daemon = daemon_factory({"m": ["--startup-delay", "0.5"]})
    replies = handshakes(daemon, "m", 30)
    endpoints = {r.model_ipc_endpoint for r in replies}
    assert len(endpoints) == 1 and endpoints != {""}, [r.error_message for r in replies]
    assert all(list(r.protocols) == ["ping"] for r in replies)
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
    for _ in range(6):                       # 1.8 s of use, each within keep_alive
        time.sleep(0.3)
        assert daemon.handshake("m").model_ipc_endpoint
    assert daemon.model("m")["pid"] == pid
    wait_until(lambda: daemon.model("m") is None, 5, message="the idle unload")
    assert not pid_alive(pid)


def test_keep_alive_zero_and_load_model_override(daemon_factory):
    daemon = daemon_factory({"m": [], "n": []}, keep_alive=0)
    assert daemon.handshake("m").model_ipc_endpoint
    wait_until(lambda: daemon.model("m") is None, 5, message="unloaded as soon as idle")
    reply = daemon.request("load-model", {"model_name": "n", "keep_alive": -1})
    assert reply["success"] and reply["data"]["model"]["unload_at"] is None
    time.sleep(0.5)
    assert daemon.model("n")["state"] == "ready"
    assert daemon.request("load-model", {"model_name": "n", "keep_alive": "x"})["code"] == \
        "bad_param"


def test_lru_eviction_skips_pinned_and_reports_evicted(daemon_factory):
    daemon = daemon_factory({"a": [], "b": [], "c": [], "d": []}, max_loaded_models=3)
    daemon.reconfigure(lambda document: document["supported_models"][0].update(pinned=True))
    sub = daemon.context.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(f"ipc://{daemon.runtime_dir}/events.sock")
    time.sleep(0.2)                                   # slow joiner
    for name in ("a", "b", "c"):
        assert daemon.load(name)["success"]
    daemon.handshake("b")                             # c is now the least recently used...
    time.sleep(0.05)
    daemon.handshake("a")                             # ...a is pinned anyway
    assert daemon.load("d")["success"]
    loaded = sorted(m["name"] for m in daemon.request("status")["data"]["models"])
    assert loaded == ["a", "b", "d"]
    events = []
    while sub.poll(500):
        events.append(json.loads(sub.recv()))
    sub.close()
    evicted = [e for e in events if e["state"] == "evicted"]
    assert [e["model"] for e in evicted] == ["c"]
    assert "to make room for d" in evicted[0]["reason"]
    sequence = [e["state"] for e in events if e["model"] == "c"]
    assert sequence == ["loading", "ready", "evicted", "unloading", "unloaded"]


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


def test_events_command_follows_a_lifecycle(daemon_factory):
    daemon = daemon_factory({"a": []})
    follower = subprocess.Popen(
        [sys.executable, "-m", "backend_mgmt", "events", "--json", "--count", "4",
         "--timeout", "20", "--config", daemon.config_path],
        stdout=subprocess.PIPE, text=True, env={**__import__("os").environ,
                                               "PYTHONPATH": REPO})
    try:
        time.sleep(1.0)                               # let it subscribe
        daemon.load("a")
        daemon.request("unload-model", {"model_name": "a"})
        out, _ = follower.communicate(timeout=25)
    finally:
        follower.kill()
    events = [json.loads(line) for line in out.splitlines()]
    assert [e["state"] for e in events] == ["loading", "ready", "unloading", "unloaded"]
    assert events[1]["endpoint"].startswith("ipc://") and events[1]["pid"]
    assert all(e["model"] == "a" and e["time"].endswith("Z") for e in events)
