"""Which reload requests share a validation (reloads.ReloadQueue, pure)."""

from backend_mgmt.reloads import ReloadQueue


def test_same_bytes_join_other_bytes_wait_for_their_own():
    queue = ReloadQueue()
    assert queue.add(b"A", "r1") is False
    running = queue.start_next()
    assert running.data == b"A" and queue.start_next() is None      # one at a time
    assert queue.add(b"A", "r2") is True                            # same file: joins
    assert queue.add(b"B", "r3") is False                           # changed: waits
    assert queue.add(b"B", "r4") is True                            # joins the waiting one
    assert queue.add(b"A", "r5") is False                           # changed back: its own
    assert queue.finish().waiters == ["r1", "r2"]
    assert queue.start_next().waiters == ["r3", "r4"]
    assert queue.finish().data == b"B"
    assert queue.start_next().waiters == ["r5"]
    assert queue.finish() is not None and queue.start_next() is None


def test_an_unreadable_file_is_never_joined():
    queue = ReloadQueue()
    queue.add(None, "r1")
    queue.start_next()
    assert queue.add(None, "r2") is False       # read it again: it may be readable by then
