import pytest

from backend_mgmt import states
from backend_mgmt.config import ModelSpec
from backend_mgmt.errors import InvalidTransition
from backend_mgmt.registry import Backend, Registry

EDGES = [
    (None, states.LOADING), (None, states.FAILED),
    (states.LOADING, states.READY), (states.LOADING, states.FAILED),
    (states.LOADING, states.RESTARTING), (states.LOADING, states.UNLOADING),
    (states.READY, states.RESTARTING), (states.READY, states.FAILED),
    (states.READY, states.UNLOADING),
    (states.RESTARTING, states.LOADING), (states.RESTARTING, states.FAILED),
    (states.RESTARTING, states.UNLOADED),
    (states.FAILED, states.LOADING), (states.FAILED, states.UNLOADED),
    (states.UNLOADING, states.UNLOADED),
]


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
    (o, n) for o in PATHS for n in sorted(states.ALL) if (o, n) not in EDGES])
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
