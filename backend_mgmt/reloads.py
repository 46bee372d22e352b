"""Which reload requests share a validation (pure bookkeeping; the daemon does the IO).

Each request is answered for the config file as it was when the request came: the daemon
reads the file's bytes then, and a request joins a validation only when it is for the same
bytes (the one under way when nothing waits behind it, else the last one waiting). A request
for other bytes waits for its own validation, which starts once the one under way is done,
so a file changed during a validation is never merged into it and dropped.
"""

import collections


class Reload:
    """One validation: the bytes it is for (None: the file could not be read) and the
    callbacks of the requests it answers."""

    __slots__ = ("data", "waiters")

    def __init__(self, data, waiters):
        self.data = data
        self.waiters = waiters


class ReloadQueue:
    def __init__(self):
        self.running = None                   # the Reload being validated or applied
        self.waiting = collections.deque()    # Reloads to run after it, in order

    def add(self, data, done):
        """A request for the file's bytes ``data``; True if it joined one already known."""
        last = self.waiting[-1] if self.waiting else self.running
        if last is not None and last.data == data and data is not None:
            last.waiters.append(done)
            return True
        self.waiting.append(Reload(data, [done]))
        return False

    def start_next(self):
        """The Reload to run now, or None (one is running, or none waits)."""
        if self.running is not None or not self.waiting:
            return None
        self.running = self.waiting.popleft()
        return self.running

    def finish(self):
        """The Reload that was running; the next may start."""
        done, self.running = self.running, None
        return done
