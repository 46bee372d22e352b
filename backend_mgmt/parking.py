"""How a backend is parked (its GPU memory released, its process kept) and woken again.

The scheduler and the manager decide *when* (scheduler.py, manager.py); this module is *how*,
per model type (``park:`` in the config):

- ``protocol``: the backend advertised the ``sleep`` protocol in its handshake; the daemon
  sends it ``Sleep`` messages on the backend's own endpoint (handshake.proto);
- ``command``: argv templates the daemon runs to park and to wake, ``{pid}``, ``{endpoint}``
  and ``{unit}`` substituted (e.g. ``cuda-checkpoint --toggle --pid {pid}``).

A model without ``park:`` is unloaded as before.
"""

from dataclasses import dataclass

PROTOCOL = "protocol"
COMMAND = "command"
METHODS = (PROTOCOL, COMMAND)
SLEEP_PROTOCOL = "sleep"          # the name a backend advertises in Response.protocols
DEFAULT_TIMEOUT = 60.0            # seconds for one park or one wake


@dataclass(frozen=True)
class ParkSettings:
    """A model type's ``park:`` settings, as config.py parsed them."""
    method: str                          # PROTOCOL or COMMAND
    park_command: tuple = ()             # argv template (COMMAND only)
    wake_command: tuple = ()             # argv template (COMMAND only)
    timeout: float = DEFAULT_TIMEOUT     # for one park, and for one wake


class Parker:
    """Parks and wakes one backend.

    ``park(done)`` and ``wake(done)`` start the step and return at once; ``done(None)`` is
    called when it succeeded, ``done("what went wrong")`` when it failed or took longer than
    the timeout: exactly once, later, from the loop (never from inside the call).
    ``cancel()`` abandons a step in flight: its ``done`` is then never called."""

    def park(self, done):
        raise NotImplementedError

    def wake(self, done):
        raise NotImplementedError

    def cancel(self):
        pass


def parker_for(loop, context, backend):
    """The Parker for ``backend`` (a registry.Backend) from its spec's ``park`` settings, or
    None when it cannot park: no ``park:``, or ``protocol`` and the backend did not
    advertise the sleep protocol."""
    return None
