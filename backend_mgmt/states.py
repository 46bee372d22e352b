"""Backend states and the transitions allowed between them.

Plain constants and tables only: this module imports nothing, so the rules can be read (and
tested) on their own. ``registry.Registry.transition`` is the one place that applies them.

Every state a backend can be in is here, including those that differ only in what comes next
(a restart that fails counts as a crash, a load that fails is final...). Users see fewer:
``SHOWN_AS`` maps each state to the name status, events and metrics show for it, and a
``Backend``'s ``state`` is that name while its ``phase`` is the state itself.
"""

# The states users see (status, events, metrics), each also a state of its own.
LOADING = "loading"        # started by load-model, waiting for the handshake; a failure is final
READY = "ready"            # answered the handshake; clients may use it
RESTARTING = "restarting"  # exited unexpectedly, waiting out a backoff before the next start
FAILED = "failed"          # gave up: crashed at start, timed out, or exited with no restart due
UNLOADING = "unloading"    # asked to stop (unload-model or shutdown), waiting for the exit
UNLOADED = "unloaded"      # gone; the registry forgets the model on entering this state
PARKING = "parking"        # ready, being parked: releasing its GPU memory (still holds it)
PARKED = "parked"          # its process runs, its weights in host memory; no GPU, no slot
WAKING = "waking"          # parked, being woken on the GPUs it had; holds them again

# States shown as one of the above.
ADOPTING = "adopting"                      # a unit of a previous daemon, waiting for the
                                           # handshake; a failure is final (shown loading)
RESTART_LOADING = "restart-loading"        # started again by the restart policy; a failure
                                           # counts as another crash (shown loading)
STOPPING_STALLED = "stopping-stalled"      # a restart that will not become ready, being
                                           # stopped; its exit is a crash (shown loading)
STOPPING_HUNG = "stopping-hung"            # a ready backend that stopped answering, being
                                           # stopped; its exit is a crash (shown ready)
FAILED_STOPPING = "failed-stopping"        # failed, its process still being stopped
FAILED_STOPPING_THEN_LOAD = "failed-stopping-then-load"      # ...and load-model asked for it
FAILED_STOPPING_THEN_FORGET = "failed-stopping-then-forget"  # ...and unload-model forgets it

SHOWN_AS = {
    LOADING: LOADING, READY: READY, RESTARTING: RESTARTING, FAILED: FAILED,
    UNLOADING: UNLOADING, UNLOADED: UNLOADED,
    PARKING: PARKING, PARKED: PARKED, WAKING: WAKING,
    ADOPTING: LOADING, RESTART_LOADING: LOADING, STOPPING_STALLED: LOADING,
    STOPPING_HUNG: READY,
    FAILED_STOPPING: FAILED, FAILED_STOPPING_THEN_LOAD: FAILED,
    FAILED_STOPPING_THEN_FORGET: FAILED,
}

ALL = frozenset(SHOWN_AS)
# The names users see (status.data.models[].state, events, metrics).
SHOWN = frozenset(SHOWN_AS.values())
# Names shown in status.data.models (every one but the terminal one).
VISIBLE = SHOWN - {UNLOADED}

# Waiting for the handshake, a probe asking.
STARTING = frozenset({LOADING, ADOPTING, RESTART_LOADING})
# Parking, parked or being woken: the process runs, a Parker (parking.py) drives it.
PARK_TIER = frozenset({PARKING, PARKED, WAKING})
# Its process runs and status shows its uptime (a failed one's does not count).
ACTIVE = frozenset(s for s in ALL if SHOWN_AS[s] in (LOADING, READY, UNLOADING)) | PARK_TIER
# Being stopped for a failure: the exit that follows is a crash, for the restart policy.
STOPPING_FOR_FAILURE = frozenset({STOPPING_STALLED, STOPPING_HUNG})
# Failed, with the process still being stopped.
FAILED_AND_STOPPING = frozenset({FAILED_STOPPING, FAILED_STOPPING_THEN_LOAD,
                                 FAILED_STOPPING_THEN_FORGET})
# Holds a slot of max_loaded_models: running or about to run, or its memory not freed yet.
# A parked backend holds neither a slot nor GPU memory: that is what parking is for.
HOLDS_SLOT = ACTIVE - {PARKED} | {RESTARTING}
# Holds host memory for parked weights (the host_memory budget): until it woke or is gone.
HOLDS_HOST_MEMORY = PARK_TIER
# A new load of the model joins it (answered at once when ready). Not one being parked: it
# waits for the park to finish, then wakes.
LOADED_OR_COMING = HOLDS_SLOT - {UNLOADING, PARKING}

ALLOWED = {
    None: {
        LOADING,                     # load-model of a model not known yet
        ADOPTING,                    # a running unit of a previous daemon
        FAILED,                      # a unit found dead when the daemon (re)started
    },
    PARKING: {
        PARKED,                      # the park step succeeded: its GPU memory is free
        UNLOADING,                   # the park failed or timed out (unload it instead), or
                                     # unload-model or shutdown overtook it
        UNLOADED,                    # its process exited while parking: reported, forgotten
    },
    PARKED: {
        WAKING,                      # a load-model or handshake wants it, and there is room
        UNLOADING,                   # keep_alive after parking, host_memory full,
                                     # unload-model, shutdown, definition changed
        UNLOADED,                    # its process exited while parked: reported, forgotten
    },
    WAKING: {
        READY,                       # the wake step succeeded
        STOPPING_STALLED,            # the wake failed or timed out: stop it; its exit is a
                                     # crash, so the restart policy starts it cold
        RESTARTING,                  # exited during the wake; the policy restarts it
        FAILED,                      # exited during the wake; no restart due
        UNLOADING,                   # unload-model or shutdown during the wake
    },
    LOADING: {
        READY,                       # handshake answered
        FAILED,                      # exited during start-up, or could not be started
        FAILED_STOPPING,             # startup_timeout passed or the probe gave up: stop it
        UNLOADING,                   # unload-model or shutdown during the load
    },
    ADOPTING: {
        READY,                       # handshake answered
        PARKED,                      # a unit the previous daemon had parked (parked.json)
        FAILED,                      # exited before it answered
        FAILED_STOPPING,             # startup_timeout passed or the probe gave up: stop it
        UNLOADING,                   # unload-model, shutdown, or its definition changed
    },
    RESTART_LOADING: {
        READY,                       # handshake answered
        RESTARTING,                  # exited during start-up and the policy retries
        FAILED,                      # exited during start-up and the policy gives up
        STOPPING_STALLED,            # startup_timeout passed or the probe gave up: stop it
        UNLOADING,                   # unload-model or shutdown during the restart
    },
    STOPPING_STALLED: {
        RESTARTING,                  # exited; the policy retries
        FAILED,                      # exited; the policy gives up (flapping)
        UNLOADING,                   # unload-model or shutdown while it is being stopped
    },
    READY: {
        STOPPING_HUNG,               # liveness: it stopped answering
        RESTARTING,                  # exited unexpectedly; the policy restarts it
        FAILED,                      # exited unexpectedly; no restart due
        UNLOADING,                   # unload-model, shutdown, idle, evicted, reloaded
        PARKING,                     # idle for park_after, or evicted to a model that can park
    },
    STOPPING_HUNG: {
        RESTARTING,                  # exited; the policy restarts it
        FAILED,                      # exited; no restart due
        UNLOADING,                   # unload-model or shutdown while it is being stopped
    },
    RESTARTING: {
        RESTART_LOADING,             # backoff over: start again
        LOADING,                     # load-model: start now, the rest of the backoff skipped
        FAILED,                      # restart could not even be started
        UNLOADED,                    # unload-model or shutdown during the backoff: no process
    },
    FAILED: {
        LOADING,                     # a new load-model
        UNLOADED,                    # unload-model forgets it
    },
    FAILED_STOPPING: {
        FAILED,                      # the process exited
        FAILED_STOPPING_THEN_LOAD,   # load-model: start once the process is gone
        FAILED_STOPPING_THEN_FORGET, # unload-model: forget it once the process is gone
    },
    FAILED_STOPPING_THEN_LOAD: {
        LOADING,                     # the process exited: start the load asked for
        FAILED_STOPPING_THEN_FORGET, # unload-model overtook the load
    },
    FAILED_STOPPING_THEN_FORGET: {
        UNLOADED,                    # the process exited
        FAILED_STOPPING_THEN_LOAD,   # load-model after all: start once the process is gone
    },
    UNLOADING: {
        UNLOADED,                    # the process exited
    },
    UNLOADED: set(),
}


def allowed(old, new):
    """True if a backend may move from ``old`` (None for a new one) to ``new``."""
    return new in ALLOWED.get(old, ())


def shown(state):
    """The name users see for ``state`` (None stays None: not known yet)."""
    return SHOWN_AS.get(state, state)
