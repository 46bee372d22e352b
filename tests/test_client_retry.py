"""The control client across a daemon that goes away and comes back: a real ROUTER in a thread
plays the daemon (answers, refuses with shutting_down, or dies with the request)."""

import json
import os
import threading
import time

import pytest
import zmq

from backend_mgmt import client


class FakeDaemon:
    """Serves ``behaviour(request) -> reply dict | None`` on ``endpoint`` from ``delay``
    seconds on, for ``requests`` requests (None: close without answering, like a crash)."""

    def __init__(self, endpoint, behaviours, delay=0.0):
        self.endpoint, self.behaviours, self.delay = endpoint, list(behaviours), delay
        self.seen = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        time.sleep(self.delay)
        context = zmq.Context.instance()
        sock = None
        for behaviour in self.behaviours:
            if sock is None:
                sock = context.socket(zmq.ROUTER)
                sock.setsockopt(zmq.LINGER, 1000)
                sock.bind(self.endpoint)
            if not sock.poll(10000):
                break
            peer, payload = sock.recv_multipart()
            request = json.loads(payload)
            self.seen.append(request["command"])
            reply = behaviour(request)
            if reply is None:                  # die with the request unanswered
                sock.close(linger=0)
                sock = None
                continue
            sock.send_multipart([peer, json.dumps(
                {"correlation_id": request["correlation_id"], **reply}).encode()])
        if sock is not None:
            sock.close()

    def join(self):
        self.thread.join(15)


def ok(request):
    return {"success": True, "data": {"command": request["command"]}}


def restarting(request):
    return {"success": False, "error": "the service is shutting down", "code": "shutting_down"}


def crash(request):
    return None


@pytest.fixture
def endpoint(workdir):
    return "ipc://" + os.path.join(workdir, "control.sock")


def test_waits_for_a_daemon_that_is_coming_back(endpoint):
    daemon = FakeDaemon(endpoint, [ok], delay=0.5)
    started = time.monotonic()
    reply = client.request(endpoint, "status", timeout=5, coming_back=lambda: True)
    assert reply["success"] and time.monotonic() - started >= 0.4
    daemon.join()


def test_no_daemon_and_none_coming_is_unreachable_at_once(endpoint):
    started = time.monotonic()
    with pytest.raises(client.Unreachable, match="does not exist"):
        client.request(endpoint, "status", timeout=5, coming_back=lambda: False)
    with pytest.raises(client.Unreachable):
        client.request(endpoint, "status", timeout=5)
    assert time.monotonic() - started < 1


def test_shutting_down_is_retried_until_answered(endpoint):
    daemon = FakeDaemon(endpoint, [restarting, restarting, ok])
    reply = client.request(endpoint, "load-model", {"model_name": "a"}, timeout=5,
                           coming_back=lambda: True)
    assert reply["success"] and daemon.seen == ["load-model"] * 3
    daemon.join()


def test_stop_service_takes_shutting_down_for_an_answer(endpoint):
    daemon = FakeDaemon(endpoint, [restarting, ok])
    reply = client.request(endpoint, "stop-service", timeout=5, coming_back=lambda: True)
    assert reply["code"] == "shutting_down" and daemon.seen == ["stop-service"]


def test_an_idempotent_request_lost_in_a_crash_is_sent_again(endpoint):
    daemon = FakeDaemon(endpoint, [crash, ok])
    reply = client.request(endpoint, "status", timeout=5, coming_back=lambda: True)
    assert reply["success"] and daemon.seen == ["status", "status"]
    daemon.join()


def test_a_changing_request_lost_in_a_crash_is_not_repeated(endpoint):
    daemon = FakeDaemon(endpoint, [crash, ok])
    with pytest.raises(client.ConnectionLost, match="went away"):
        client.request(endpoint, "unload-model", {"model_name": "a"}, timeout=5,
                       coming_back=lambda: True)
    assert daemon.seen == ["unload-model"]
