"""Load tests against the real daemon, sized for CI (well under 30 s together).

Many concurrent control clients must each get exactly their own replies, and many backends
loaded at once must all become ready and, once unloaded, leave no process behind.
"""

import json
import threading
import time
import uuid

import psutil

from harness import pid_alive, wait_until

CLIENTS = 20
REQUESTS = 200
BACKENDS = 20
REPLY_TIMEOUT_MS = 10_000


def _client(daemon, index, results):
    """One DEALER, one request in flight: status and list-models alternately (a per-client
    offset mixes them across clients), each with a unique correlation_id."""
    result = {"replies": 0, "lost": 0, "mismatched": 0, "wrong_data": [], "error": None}
    sock = daemon.socket()
    try:
        for i in range(REQUESTS):
            command = "status" if (i + index) % 2 == 0 else "list-models"
            correlation_id = f"{index}-{i}-{uuid.uuid4()}"
            sock.send(json.dumps({"command": command, "params": {},
                                  "correlation_id": correlation_id}).encode())
            if not sock.poll(REPLY_TIMEOUT_MS):
                result["lost"] += 1
                continue
            frames = sock.recv_multipart()
            reply = json.loads(frames[-1])
            result["replies"] += 1
            if len(frames) != 1 or reply.get("correlation_id") != correlation_id:
                result["mismatched"] += 1
                continue
            data = reply.get("data") or {}
            # The reply must be the answer to this command, not another client's.
            if not reply.get("success") or (
                    command == "status" and data.get("service_status") != "running") or (
                    command == "list-models" and
                    sorted(m["name"] for m in data.get("models", [])) != ["a", "b", "c"]):
                result["wrong_data"].append((command, reply))
    except Exception as exc:          # reported by the test, not lost in the thread
        result["error"] = repr(exc)
    finally:
        sock.close(linger=0)
        results[index] = result


def test_concurrent_clients_get_their_own_replies(daemon_factory):
    daemon = daemon_factory(models={"a": [], "b": [], "c": []})
    before = daemon.request("status")["data"]["requests"]
    results = [None] * CLIENTS
    threads = [threading.Thread(target=_client, args=(daemon, i, results), daemon=True)
               for i in range(CLIENTS)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    elapsed = time.monotonic() - started

    assert not any(thread.is_alive() for thread in threads), "clients still running after 60 s"
    assert all(r is not None for r in results)
    assert [r["error"] for r in results if r["error"]] == []
    assert sum(r["lost"] for r in results) == 0
    assert sum(r["mismatched"] for r in results) == 0
    assert [w for r in results for w in r["wrong_data"]][:3] == []
    assert sum(r["replies"] for r in results) == CLIENTS * REQUESTS

    # Still alive and serving; it counted every request.
    assert daemon.process.poll() is None, daemon.log()
    status = daemon.request("status")
    assert status["success"] and status["data"]["service_status"] == "running"
    served = status["data"]["requests"]["control"] - before["control"]
    assert served >= CLIENTS * REQUESTS, (served, elapsed)


def _send_all(sock, command, names):
    """Send one request per model at once on one DEALER; {correlation_id: name}."""
    sent = {}
    for name in names:
        correlation_id = str(uuid.uuid4())
        sock.send(json.dumps({"command": command, "params": {"model_name": name},
                              "correlation_id": correlation_id}).encode())
        sent[correlation_id] = name
    return sent


def _collect(sock, sent, timeout):
    """{name: reply} for every request in ``sent``; fails if any is missing at ``timeout``."""
    replies = {}
    deadline = time.monotonic() + timeout
    while len(replies) < len(sent):
        left = deadline - time.monotonic()
        assert left > 0, f"only {len(replies)} of {len(sent)} replies after {timeout} s"
        if sock.poll(int(left * 1000)):
            reply = json.loads(sock.recv())
            assert reply["correlation_id"] in sent, reply
            name = sent[reply["correlation_id"]]
            assert name not in replies, f"second reply for {name}"
            replies[name] = reply
    return replies


def test_many_backends_loaded_at_once_then_unloaded_leave_nothing(daemon_factory):
    names = [f"m{i:02d}" for i in range(BACKENDS)]
    daemon = daemon_factory(models={name: [] for name in names})
    sock = daemon.socket()
    try:
        loads = _collect(sock, _send_all(sock, "load-model", names), timeout=60)
        failed = {n: r for n, r in loads.items() if not r["success"]}
        assert failed == {}, daemon.log()[-3000:]
        pids = {name: reply["data"]["model"]["pid"] for name, reply in loads.items()}
        daemon.seen_pids.update(pids.values())            # killed by close() if left over
        assert len(set(pids.values())) == BACKENDS
        children = {p.pid for p in psutil.Process(daemon.process.pid).children()}
        assert set(pids.values()) <= children
        assert all(pid_alive(pid) for pid in pids.values())

        models = {m["name"]: m for m in daemon.request("status")["data"]["models"]}
        assert sorted(models) == names
        assert {m["state"] for m in models.values()} == {"ready"}
        assert {name: m["pid"] for name, m in models.items()} == pids

        unloads = _collect(sock, _send_all(sock, "unload-model", names), timeout=60)
        assert {n: r["success"] for n, r in unloads.items()} == {n: True for n in names}
        assert all(r["data"]["unloaded"] for r in unloads.values())
    finally:
        sock.close(linger=0)

    # The unload reply is sent once the process is gone: nothing may be left running.
    assert [pid for pid in pids.values() if pid_alive(pid)] == []
    wait_until(lambda: not daemon.backend_pids(), 5, message="no backend children left")
    assert daemon.request("status")["data"]["models"] == []
    listed = daemon.request("list-models")["data"]["models"]
    assert {m["state"] for m in listed} == {"unloaded"}
    assert daemon.process.poll() is None, daemon.log()
