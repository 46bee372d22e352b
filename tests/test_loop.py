"""The event loop: no deadline can overflow or jam the poll; plain descriptors and zmq
sockets are both watched."""

import math
import os

import pytest
import zmq

from backend_mgmt import loop as loop_module
from backend_mgmt.loop import EventLoop


@pytest.fixture
def loop():
    event_loop = EventLoop()
    yield event_loop
    event_loop.close()


@pytest.mark.parametrize("delay", [math.inf, 1e300, 10 ** 400, 2 * loop_module.MAX_TIMER_DELAY])
def test_a_far_timer_is_brought_in_and_the_poll_timeout_fits(loop, delay):
    timer = loop.call_later(delay, lambda: None)
    assert timer.deadline <= loop.clock() + loop_module.MAX_TIMER_DELAY
    timeout = loop._run_due_timers()
    assert 0 < timeout <= loop_module.MAX_POLL_MS
    loop._poller.poll(0)             # what run() does with it: must not overflow


def test_call_at_a_huge_deadline(loop):
    timer = loop.call_at(10 ** 400, lambda: None)
    assert timer.deadline <= loop.clock() + loop_module.MAX_TIMER_DELAY


def test_a_timer_that_is_not_a_number_is_refused(loop):
    with pytest.raises(ValueError):
        loop.call_later(math.nan, lambda: None)
    assert loop._run_due_timers() is None


def test_near_timers_are_not_changed(loop):
    now = loop.clock()
    timer = loop.call_at(now + 5, lambda: None)
    assert timer.deadline == now + 5
    assert 4000 < loop._run_due_timers() <= 5001


def test_plain_descriptors_and_zmq_sockets_are_both_dispatched(loop):
    """Plain fds wait in the loop's epoll, zmq sockets in its zmq.Poller: one wake-up runs
    the callbacks of both."""
    context = zmq.Context()
    server, client = context.socket(zmq.PAIR), context.socket(zmq.PAIR)
    server.bind("inproc://loop-test")
    client.connect("inproc://loop-test")
    read_end, write_end = os.pipe()
    seen = []
    try:
        loop.add_reader(read_end, lambda: seen.append(("fd", os.read(read_end, 10))))
        loop.add_reader(server, lambda: seen.append(("zmq", server.recv())))
        os.write(write_end, b"x")
        client.send(b"y")
        loop.call_later(0.2, loop.stop)
        loop.run()
        assert sorted(seen) == [("fd", b"x"), ("zmq", b"y")]
        loop.remove_reader(server)
        loop.add_reader(read_end, lambda: seen.append("replaced"))   # a new callback
        os.write(write_end, b"z")
        loop.call_later(0.1, loop.stop)
        loop.run()
        assert seen[-1] == "replaced"
    finally:
        os.close(write_end)
        server.close(linger=0)
        client.close(linger=0)
        context.term()
    os.close(read_end)
    loop.remove_reader(read_end)       # closed before it was removed: no error


def test_a_closed_descriptor_that_was_removed_leaves_nothing_behind(loop):
    read_end, write_end = os.pipe()
    loop.add_reader(read_end, lambda: None)
    loop.remove_reader(read_end)
    os.close(read_end)
    again_read, again_write = os.pipe()   # may reuse the number
    fired = []
    try:
        loop.add_reader(again_read, lambda: fired.append(os.read(again_read, 1)))
        os.write(again_write, b"k")
        loop.call_later(0.1, loop.stop)
        loop.run()
        assert fired == [b"k"]
    finally:
        loop.remove_reader(again_read)
        for fd in (write_end, again_read, again_write):
            os.close(fd)
