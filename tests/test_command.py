"""run_async: helper commands without blocking the loop; on_done is always called."""

import time

from backend_mgmt.loop import run_async
from backend_mgmt.loop import EventLoop

from test_exhaustion import no_free_descriptors


def run(argv, hog=False, timeout=10.0, then=lambda command: None):
    """``argv`` through run_async; ``then(its RunningCommand)`` is called once it started."""
    loop = EventLoop()
    results = []

    def done(result):
        results.append(result)
        loop.stop()
    try:
        if hog:
            with no_free_descriptors():
                then(run_async(loop, argv, done))
        else:
            then(run_async(loop, argv, done))
        loop.call_later(timeout, loop.stop)
        loop.run()
    finally:
        loop.close()
    assert len(results) == 1, "on_done was not called exactly once"
    return results[0]


def test_a_command_that_cannot_be_started_is_answered():
    result = run(["/nonexistent/command"], then=lambda command: command.kill())   # no-op
    assert result.returncode == 127 and not result.ok
    assert "No such file" in result.stderr


def test_a_command_that_cannot_be_started_for_want_of_descriptors_is_answered():
    result = run(["true"], hog=True)
    assert result.returncode == 127 and "Too many open files" in result.stderr


def test_output_and_exit_code():
    started = time.monotonic()
    result = run(["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert (result.returncode, result.stdout, result.stderr) == (3, "out\n", "err\n")
    assert time.monotonic() - started < 5


def test_a_killed_command_ends_at_once_and_is_still_answered():
    started = time.monotonic()
    result = run(["sleep", "30"], then=lambda command: command.kill())
    assert result.returncode == -9 and not result.timed_out and not result.ok
    assert time.monotonic() - started < 5
