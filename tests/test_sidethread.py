"""The side thread (sidethread.py): serves its sockets off the loop, survives a bad
callback, runs its tickers only when they ask, and stops when told."""

import threading
import time

import zmq

from backend_mgmt.sidethread import SideThread


def wait_for(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.005)
    return predicate()


def test_it_reads_its_sockets_survives_a_failing_callback_and_stops():
    context = zmq.Context()
    side = SideThread()
    pull = context.socket(zmq.PULL)
    pull.bind("inproc://side-test")
    push = context.socket(zmq.PUSH)
    push.connect("inproc://side-test")
    got = []

    def on_message():
        message = pull.recv()
        if message == b"bad":
            raise RuntimeError("a bad event")
        got.append((message, threading.current_thread().name))
    side.add_reader(pull, on_message)
    try:
        side.start()
        push.send(b"bad")
        push.send(b"good")
        assert wait_for(lambda: got), "the message after a failing callback is read"
        assert got == [(b"good", side.name)]
    finally:
        side.stop()
        assert not side.running
        for sock in (push, pull):
            sock.close(linger=0)
        context.term()


def test_a_ticker_runs_when_it_asks_and_not_otherwise():
    calls = []
    wanted = {"every": 0.02}

    def tick():
        calls.append(time.monotonic())
        return wanted["every"]
    side = SideThread()
    side.add_ticker(tick)
    try:
        side.start()
        assert wait_for(lambda: len(calls) >= 5), "a ticker asking every 20 ms is called"
        wanted["every"] = None
        time.sleep(0.05)
        settled = len(calls)
        time.sleep(0.2)
        assert len(calls) == settled, "a ticker returning None is not called again"
    finally:
        side.stop()
