"""The event PUB socket (events.py) in-process, with a real ZeroMQ subscriber.

README: "A subscriber that does not keep up loses events beyond 10,000 queued; the daemon never
waits for it." Producing tens of thousands of state changes through a real daemon would take
minutes, so the daemon's own publisher object is driven directly here.
"""

import json
import shutil
import threading
import time
import types

import pytest
import zmq

from backend_mgmt.events import EventPublisher
from harness import short_tempdir

PUBLISHED = 40_000       # well past the 10,000 bound plus what libzmq and the kernel buffer


@pytest.fixture
def publisher_and_subscriber():
    directory = short_tempdir()
    context = zmq.Context()
    endpoint = f"ipc://{directory}/events.sock"
    publisher = EventPublisher.bind(context, endpoint)
    sub = context.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.RCVHWM, 100)       # the subscriber's own queue: small, so the bound shows
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(endpoint)
    try:
        yield publisher, sub
    finally:
        sub.close(linger=0)
        publisher.close()
        context.term()
        shutil.rmtree(directory, ignore_errors=True)


def backend(name="demo"):
    return types.SimpleNamespace(name=name, pid=1234, unit=None, restarts=0,
                                 endpoint="ipc:///x.sock")


def subscribed(publisher, sub, timeout=10):
    """Publish until the subscriber sees an event (its subscription has reached the PUB)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        publisher.publish(backend("warm-up"), "loading")
        if sub.poll(20):
            while sub.poll(100):                  # drain the warm-up events
                sub.recv()
            return
    raise AssertionError("the subscriber never saw an event")


def test_a_slow_subscriber_loses_events_past_the_bound_and_never_stalls(
        publisher_and_subscriber):
    publisher, sub = publisher_and_subscriber
    subscribed(publisher, sub)
    done = threading.Event()

    def flood():
        for index in range(PUBLISHED):
            publisher.publish(backend(f"m{index}"), "ready", "loading", "answered")
        done.set()
    flooder = threading.Thread(target=flood, daemon=True)
    flooder.start()
    # The subscriber reads nothing meanwhile; the publisher must not wait for it.
    assert done.wait(30), "publishing stalled on a subscriber that does not read"
    received = []
    while sub.poll(500):
        received.append(sub.recv())
    # About 10,000 (libzmq counts its queues in whole messages; the kernel adds a little):
    # far from all of them, and far from a bound ten times smaller.
    assert 9_000 <= len(received) <= 20_000, len(received)
    # What is lost is what came past the bound: the first events arrive, in order.
    first = [int(m.split(b'"model":"m')[1].split(b'"')[0]) for m in received[:100]]
    assert first == list(range(100))


def test_events_carry_the_documented_fields(publisher_and_subscriber):
    publisher, sub = publisher_and_subscriber
    subscribed(publisher, sub)
    publisher.publish(backend("demo"), "ready", "loading", "answered the handshake")
    publisher.publish(backend("demo"), "unloading", "ready", "unload-model")
    assert sub.poll(5000)
    ready = json.loads(sub.recv())
    assert sub.poll(5000)
    unloading = json.loads(sub.recv())
    assert {k: ready[k] for k in ("model", "state", "previous", "reason", "pid", "unit",
                                  "endpoint", "restarts")} == {
        "model": "demo", "state": "ready", "previous": "loading",
        "reason": "answered the handshake", "pid": 1234, "unit": None,
        "endpoint": "ipc:///x.sock", "restarts": 0}
    assert ready["time"].endswith("Z") and abs(ready["timestamp"] - time.time()) < 60
    assert unloading["endpoint"] is None                 # set on ready only
