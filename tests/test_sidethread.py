"""The side thread (sidethread.py): serves its sockets off the loop, survives a bad
callback, runs its tickers only when they ask, and stops when told."""

import threading
import time

import pytest
import zmq

from backend_mgmt.sidethread import SideThread


def wait_for(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.005)
    return predicate()


@pytest.fixture
def pipe():
    """(pull, push): an inproc pipe for the side thread to read; closed after the test."""
    context = zmq.Context()
    pull = context.socket(zmq.PULL)
    pull.bind("inproc://side-test")
    push = context.socket(zmq.PUSH)
    push.connect("inproc://side-test")
    yield pull, push
    for sock in (push, pull):
        sock.close(linger=0)
    context.term()


def test_it_reads_its_sockets_survives_a_failing_callback_and_stops(pipe):
    pull, push = pipe
    side = SideThread()
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


def test_call_and_wait_runs_after_what_the_sockets_held(pipe):
    """The restart drain relies on it: what was queued on the thread's sockets before the
    call has been handled when it returns."""
    pull, push = pipe
    side = SideThread()
    got, seen_at_call = [], []

    def on_message():
        while pull.poll(0):
            got.append(pull.recv())
            time.sleep(0.002)            # slow, so a call run first would see fewer
    side.add_reader(pull, on_message)
    try:
        side.start()
        # Keep the thread busy meanwhile, so the messages and the call are both waiting
        # when it next looks: the call must come after the messages all the same.
        busy = threading.Thread(target=side.call_and_wait, args=(lambda: time.sleep(0.2), 5.0))
        busy.start()
        time.sleep(0.05)
        for number in range(20):
            push.send(b"%d" % number)
        assert side.call_and_wait(lambda: seen_at_call.append(len(got)), 5.0)
        busy.join(5)
        assert seen_at_call == [20]
    finally:
        side.stop()
        assert not side.call_and_wait(lambda: None, 0.1), "a stopped thread runs nothing"


def test_a_failing_poll_does_not_end_the_thread(pipe):
    """Fault injection (a poll that fails is hard to cause on purpose): the guard's counts
    depend on this thread, so a poll error is logged and the thread goes on."""
    pull, push = pipe
    side = SideThread()
    got = []
    side.add_reader(pull, lambda: got.append(pull.recv()))
    real_poll, failures = side._poller.poll, []

    def poll_failing_once(timeout=None):
        if not failures:
            failures.append(timeout)
            raise zmq.ZMQError(zmq.EFAULT)
        return real_poll(timeout)
    side._poller.poll = poll_failing_once
    try:
        side.start()
        push.send(b"after the failure")
        assert wait_for(lambda: got), "the thread goes on after a failed poll"
        assert failures and side.running
    finally:
        side.stop()
