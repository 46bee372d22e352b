import pytest

from backend_mgmt import states
from backend_mgmt.config import ModelSpec
from backend_mgmt.errors import InvalidTransition
from backend_mgmt.registry import Backend, Registry

# The edges README.md describes, written from its text (not from states.ALLOWED), each with the
# sentence it comes from. A state change the README does not describe must be refused.
LOADING, READY, RESTARTING, FAILED, UNLOADING, UNLOADED = (
    "loading", "ready", "restarting", "failed", "unloading", "unloaded")
PARKING, PARKED, WAKING = "parking", "parked", "waking"
EDGES = [
    # load-model NAME: "load a model; returns when its backend is ready, or failed and why".
    (None, LOADING), (LOADING, READY), (LOADING, FAILED),
    # "Units outlive the daemon ... reports as failed a unit that ended while no daemon was
    # watching" (a model the new daemon never saw loading).
    (None, FAILED),
    # "cancelled (an unload or shutdown overtook the load)".
    (LOADING, UNLOADING),
    # "A backend that was ready and ends without being asked to is restarted by its restart
    # policy after min(backoff...)": ready -> restarting; "While waiting the model is
    # restarting"; then it starts again: restarting -> loading.
    (READY, RESTARTING), (RESTARTING, LOADING),
    # "a restart that fails to start counts as another crash": loading -> restarting.
    (LOADING, RESTARTING),
    # "After max_restarts within window the model is failed (code flapping)", or the policy
    # ("no", or a clean exit under on-failure) restarts nothing: a crash while ready, or a
    # restart that fails to start, ends in failed; so does a restart that cannot be started.
    (READY, FAILED), (RESTARTING, FAILED),
    # "unload-model or shutdown cancels the restart": no process, so nothing to wait for.
    (RESTARTING, UNLOADED),
    # "A failed model answers its failure until a load-model" (failed -> loading), and
    # unload-model "stop[s] the model's backend ... and forget[s] it" (failed -> unloaded).
    (FAILED, LOADING), (FAILED, UNLOADED),
    # unload-model of a ready model: "SIGTERM, SIGKILL after stop_timeout": unloading until
    # the process is gone, then forgotten.
    (READY, UNLOADING), (UNLOADING, UNLOADED),
    # "Parking models": "an idle model ... is parked after park_after", "evicted ... it is
    # parked instead of unloaded": ready -> parking -> parked.
    (READY, PARKING), (PARKING, PARKED),
    # "a park that fails or times out unloads the model"; unload-model or shutdown overtakes
    # a park the same way.
    (PARKING, UNLOADING),
    # "a parked backend whose process exits is reported and unloaded" (parking or parked).
    (PARKING, UNLOADED), (PARKED, UNLOADED),
    # "a load-model or handshake for a parked model wakes it": parked -> waking -> ready.
    (PARKED, WAKING), (WAKING, READY),
    # "keep_alive ... unloads a parked model", host_memory full, unload-model, shutdown.
    (PARKED, UNLOADING), (WAKING, UNLOADING),
    # "A wake that fails or times out is stopped and restarted cold under the restart policy"
    # (shown loading while it is stopped), and one that exits during the wake is a crash.
    (WAKING, LOADING), (WAKING, RESTARTING), (WAKING, FAILED),
    # "a daemon restart keeps parked models parked": the new daemon adopts them as parked.
    (LOADING, PARKED),
]
# The states README.md names for status.data.models[].state, plus the terminal one.
DOCUMENTED_STATES = {LOADING, READY, RESTARTING, FAILED, UNLOADING, UNLOADED,
                     PARKING, PARKED, WAKING}


def test_the_states_shown_are_the_documented_ones():
    assert states.SHOWN == DOCUMENTED_STATES
    assert states.VISIBLE == DOCUMENTED_STATES - {UNLOADED}   # "not loaded: not listed"
    assert all(states.SHOWN_AS[s] == s for s in DOCUMENTED_STATES)
    assert set(states.ALLOWED) == states.ALL | {None}      # every state has its row


def test_the_table_shown_is_the_documented_edges():
    """Every edge of the whole table is, as users see it, an edge README describes or no
    change at all; and every documented edge is taken by some edge of the table."""
    shown = {(states.shown(old), states.shown(new))
             for old, news in states.ALLOWED.items() for new in news}
    assert {(o, n) for o, n in shown if o != n} == set(EDGES)


def test_inner_edges_keep_what_users_see():
    """The edges between states shown alike: stopping a hung or stalled backend, and a failed
    one whose process is still going (README: a hung backend is stopped and restarted)."""
    inner = {(old, new) for old, news in states.ALLOWED.items() for new in news
             if old is not None and states.shown(old) == states.shown(new)}
    assert inner == {
        (states.READY, states.STOPPING_HUNG),
        (states.RESTART_LOADING, states.STOPPING_STALLED),
        (states.FAILED_STOPPING, states.FAILED),
        (states.FAILED_STOPPING, states.FAILED_STOPPING_THEN_LOAD),
        (states.FAILED_STOPPING, states.FAILED_STOPPING_THEN_FORGET),
        (states.FAILED_STOPPING_THEN_LOAD, states.FAILED_STOPPING_THEN_FORGET),
        (states.FAILED_STOPPING_THEN_FORGET, states.FAILED_STOPPING_THEN_LOAD),
    }


def test_named_sets():
    assert states.STARTING == {states.LOADING, states.ADOPTING, states.RESTART_LOADING}
    # README "Parking models": a parked model's process runs, but it holds no slot of
    # max_loaded_models and no GPU memory; parking and waking ones hold both.
    assert states.ACTIVE == {s for s in states.ALL
                             if states.shown(s) in (LOADING, READY, UNLOADING, PARKING, PARKED,
                                                    WAKING)}
    assert states.HOLDS_SLOT == states.ACTIVE - {PARKED} | {RESTARTING}
    assert PARKING in states.HOLDS_SLOT and WAKING in states.HOLDS_SLOT
    assert states.HOLDS_HOST_MEMORY == {PARKING, PARKED, WAKING}
    # A load of a model being parked waits for the park, then wakes it.
    assert states.LOADED_OR_COMING == states.HOLDS_SLOT - {UNLOADING, PARKING}
    assert states.FAILED_AND_STOPPING == {s for s in states.ALL - {FAILED}
                                          if states.shown(s) == FAILED}
    assert states.STOPPING_FOR_FAILURE == {states.STOPPING_HUNG, states.STOPPING_STALLED}
    assert states.shown(None) is None


def backend(name="m"):
    return Backend(spec=ModelSpec(name=name, fullname=name, type="t", command=("x",)),
                   endpoint="ipc:///tmp/x")


def walk_to(registry, b, path):
    for state in path:
        registry.transition(b, state)


# A way into every state, through the table.
PATHS = {
    None: [],
    states.LOADING: [states.LOADING],
    states.READY: [states.LOADING, states.READY],
    states.RESTARTING: [states.LOADING, states.READY, states.RESTARTING],
    states.FAILED: [states.LOADING, states.FAILED],
    states.UNLOADING: [states.LOADING, states.UNLOADING],
    states.ADOPTING: [states.ADOPTING],
    states.RESTART_LOADING: [states.LOADING, states.READY, states.RESTARTING,
                             states.RESTART_LOADING],
    states.STOPPING_STALLED: [states.LOADING, states.READY, states.RESTARTING,
                              states.RESTART_LOADING, states.STOPPING_STALLED],
    states.STOPPING_HUNG: [states.LOADING, states.READY, states.STOPPING_HUNG],
    states.FAILED_STOPPING: [states.LOADING, states.FAILED_STOPPING],
    states.FAILED_STOPPING_THEN_LOAD: [states.LOADING, states.FAILED_STOPPING,
                                       states.FAILED_STOPPING_THEN_LOAD],
    states.FAILED_STOPPING_THEN_FORGET: [states.LOADING, states.FAILED_STOPPING,
                                         states.FAILED_STOPPING_THEN_FORGET],
    states.PARKING: [states.LOADING, states.READY, states.PARKING],
    states.PARKED: [states.LOADING, states.READY, states.PARKING, states.PARKED],
    states.WAKING: [states.LOADING, states.READY, states.PARKING, states.PARKED,
                    states.WAKING],
}
TABLE_EDGES = [(old, new) for old, news in states.ALLOWED.items() for new in sorted(news)]


def test_every_state_has_a_path():
    assert set(PATHS) == states.ALL - {UNLOADED} | {None}


@pytest.mark.parametrize("old, new", TABLE_EDGES)
def test_each_allowed_edge(old, new):
    registry = Registry(lambda: 1000.0)
    b = backend()
    registry.add(b)
    seen = []
    registry.listeners.append(lambda bk, o, n: seen.append((o, n)))
    walk_to(registry, b, PATHS[old])
    del seen[:]
    b.state_since = 5.0
    registry.transition(b, new, "because")
    assert b.phase == new and b.state == states.shown(new) and b.reason == "because"
    changed = states.shown(old) != states.shown(new)
    # Listeners (events, the scheduler) and state_since see only what users see change.
    assert seen == ([(states.shown(old), states.shown(new))] if changed else [])
    assert b.state_since == (1000.0 if changed else 5.0)
    assert (registry.get("m") is None) == (new == states.UNLOADED)


@pytest.mark.parametrize("old, new", [
    (o, n) for o in PATHS for n in sorted(states.ALL) if (o, n) not in TABLE_EDGES])
def test_every_other_edge_is_refused(old, new):
    registry = Registry(lambda: 0.0)
    b = backend()
    registry.add(b)
    walk_to(registry, b, PATHS[old])
    with pytest.raises(InvalidTransition):
        registry.transition(b, new)
    assert b.phase == old


def test_summary_counts_states():
    registry = Registry(lambda: 0.0)
    assert registry.summary() == "no models loaded"
    for name, path in (("a", PATHS[states.READY]), ("b", PATHS[states.READY]),
                       ("c", PATHS[states.LOADING]), ("d", PATHS[states.FAILED])):
        b = backend(name)
        registry.add(b)
        walk_to(registry, b, path)
    assert registry.summary() == "models: 2 ready, 1 loading, 1 failed"


def test_status_entry_hides_endpoint_unless_ready():
    b = backend()
    registry = Registry(lambda: 0.0)
    registry.add(b)
    registry.transition(b, states.LOADING)
    assert b.as_status()["endpoint"] is None
    registry.transition(b, states.READY)
    assert b.as_status()["endpoint"] == "ipc:///tmp/x"


def test_status_version_changes_with_what_status_shows():
    b = backend()
    first = b.version
    b.probe = object()                       # not in status: the cached entry stays valid
    assert b.version == first
    b.restarts += 1
    second = b.version
    assert second != first
    b.progress = "loading 50%"
    assert b.version != second


@pytest.mark.parametrize("old", [None, *sorted(states.ALL)])
def test_allowed_answers_the_table(old):
    assert {new for new in states.ALL if states.allowed(old, new)} == states.ALLOWED[old]


def test_each_edge_is_logged_as_users_see_it(caplog):
    caplog.set_level("INFO", logger="backend_mgmt.registry")
    registry = Registry(lambda: 0.0)
    b = backend()
    registry.add(b)
    for state, reason in [(states.LOADING, ""), (states.FAILED_STOPPING, "timed out"),
                          (states.FAILED, "timed out"), (states.LOADING, "again"),
                          (states.READY, ""), (states.STOPPING_HUNG, "hung"),
                          (states.UNLOADING, "unload-model"), (states.UNLOADED, "gone")]:
        registry.transition(b, state, reason)
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("INFO", "model m: (new) -> loading"),
        ("WARNING", "model m: loading -> failed (timed out) [loading -> failed-stopping]"),
        ("INFO", "model m: failed -> failed (timed out) [failed-stopping -> failed]"),
        ("INFO", "model m: failed -> loading (again)"),
        ("INFO", "model m: loading -> ready"),
        ("INFO", "model m: ready -> ready (hung) [ready -> stopping-hung]"),
        ("INFO", "model m: ready -> unloading (unload-model) [stopping-hung -> unloading]"),
        ("INFO", "model m: unloading -> unloaded (gone)")]
    assert registry.backends == {}
    registry.add(b2 := backend("u"))
    registry.transition(b2, states.ADOPTING)
    assert caplog.records[-1].getMessage() == "model u: (new) -> loading [(new) -> adopting]"


def test_a_name_registered_twice_is_refused():
    registry = Registry(lambda: 0.0)
    registry.add(backend())
    with pytest.raises(InvalidTransition, match="m is already registered"):
        registry.add(backend())
