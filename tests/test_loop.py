"""The event loop's timers: no deadline can overflow or jam the poll."""

import math

import pytest

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
