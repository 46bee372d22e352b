import pytest

from backend_mgmt import states
from backend_mgmt.config import ModelSpec
from backend_mgmt.errors import InvalidTransition
from backend_mgmt.registry import Backend, Registry

# The edges README.md describes, written from its text (not from states.ALLOWED), each with the
# sentence it comes from. A state change the README does not describe must be refused.
LOADING, READY, RESTARTING, FAILED, UNLOADING, UNLOADED = (
    "loading", "ready", "restarting", "failed", "unloading", "unloaded")
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
]
# The states README.md names for status.data.models[].state, plus the terminal one.
DOCUMENTED_STATES = {LOADING, READY, RESTARTING, FAILED, UNLOADING, UNLOADED}


def test_the_states_are_the_documented_ones():
    assert states.ALL == DOCUMENTED_STATES
    assert states.VISIBLE == DOCUMENTED_STATES - {UNLOADED}   # "not loaded: not listed"


def backend(name="m"):
    return Backend(spec=ModelSpec(name=name, fullname=name, type="t", command=("x",)),
                   endpoint="ipc:///tmp/x")


def walk_to(registry, b, path):
    for state in path:
        registry.transition(b, state)


PATHS = {
    None: [],
    states.LOADING: [states.LOADING],
    states.READY: [states.LOADING, states.READY],
    states.RESTARTING: [states.LOADING, states.READY, states.RESTARTING],
    states.FAILED: [states.LOADING, states.FAILED],
    states.UNLOADING: [states.LOADING, states.UNLOADING],
}


@pytest.mark.parametrize("old, new", EDGES)
def test_each_allowed_edge(old, new):
    registry = Registry()
    b = backend()
    registry.add(b)
    seen = []
    registry.listeners.append(lambda bk, o, n: seen.append((o, n)))
    walk_to(registry, b, PATHS[old])
    registry.transition(b, new, "because")
    assert b.state == new and b.reason == "because"
    assert seen[-1] == (old, new)
    assert (registry.get("m") is None) == (new == states.UNLOADED)


@pytest.mark.parametrize("old, new", [
    (o, n) for o in PATHS for n in sorted(DOCUMENTED_STATES) if (o, n) not in EDGES])
def test_every_other_edge_is_refused(old, new):
    registry = Registry()
    b = backend()
    registry.add(b)
    walk_to(registry, b, PATHS[old])
    with pytest.raises(InvalidTransition):
        registry.transition(b, new)
    assert b.state == old


def test_summary_counts_states():
    registry = Registry()
    assert registry.summary() == "no models loaded"
    for name, path in (("a", PATHS[states.READY]), ("b", PATHS[states.READY]),
                       ("c", PATHS[states.LOADING]), ("d", PATHS[states.FAILED])):
        b = backend(name)
        registry.add(b)
        walk_to(registry, b, path)
    assert registry.summary() == "models: 2 ready, 1 loading, 1 failed"


def test_status_entry_hides_endpoint_unless_ready():
    b = backend()
    registry = Registry()
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


@pytest.mark.parametrize("old", [None, *sorted(DOCUMENTED_STATES)])
def test_allowed_answers_the_documented_edges(old):
    assert {new for new in DOCUMENTED_STATES if states.allowed(old, new)} == \
        {new for (o, new) in EDGES if o == old}
