"""Backend states and the transitions allowed between them.

Plain constants and tables only: this module imports nothing, so the rules can be read (and
tested) on their own. ``registry.Registry.transition`` is the one place that applies them.
"""

LOADING = "loading"        # process started, waiting for it to answer a handshake
READY = "ready"            # answered the handshake; clients may use it
RESTARTING = "restarting"  # exited unexpectedly, waiting out a backoff before the next start
FAILED = "failed"          # gave up: crashed at start, timed out, or exited with no restart due
UNLOADING = "unloading"    # asked to stop (unload-model or shutdown), waiting for the exit
UNLOADED = "unloaded"      # gone; the registry forgets the model on entering this state

ALL = frozenset({LOADING, READY, RESTARTING, FAILED, UNLOADING, UNLOADED})

# States in which a backend process may be running (or about to be).
ACTIVE = frozenset({LOADING, READY, UNLOADING})
# States shown in status.data.models (every state but the terminal one).
VISIBLE = frozenset({LOADING, READY, RESTARTING, FAILED, UNLOADING})

ALLOWED = {
    None: {
        LOADING,                     # load-model of a model not known yet, or adopting a unit
        FAILED,                      # a unit found dead when the daemon (re)started
    },
    LOADING: {
        READY,                       # handshake answered
        FAILED,                      # exited during start-up, or startup_timeout passed
        RESTARTING,                  # exited during start-up and the policy retries
        UNLOADING,                   # unload-model or shutdown during the load
    },
    READY: {
        RESTARTING,                  # exited unexpectedly; the policy restarts it
        FAILED,                      # exited unexpectedly; no restart due
        UNLOADING,                   # unload-model or shutdown
    },
    RESTARTING: {
        LOADING,                     # backoff over: start again
        FAILED,                      # restart could not even be started
        UNLOADED,                    # unload-model or shutdown during the backoff: no process
    },
    FAILED: {
        LOADING,                     # a new load-model
        UNLOADED,                    # unload-model forgets it
    },
    UNLOADING: {
        UNLOADED,                    # the process exited
    },
    UNLOADED: set(),
}


def allowed(old, new):
    """True if a backend may move from ``old`` (None for a new one) to ``new``."""
    return new in ALLOWED.get(old, ())
