"""Control commands: a dict from command name to handler.

A handler takes the ``Parts`` it works with, the request params and a ``Reply``; it either
answers at once or keeps the Reply and answers later (load-model, unload-model). It raises
``ServiceError`` to refuse; the control endpoint (control.py) turns that into an error reply,
in one place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from . import bounds, errors, states
from .errors import ServiceError

if TYPE_CHECKING:       # names for the annotations only; the daemon builds the parts
    from .manager import BackendManager
    from .reloading import Reloader
    from .reporting import Reporter
    from .scheduler import Scheduler


@dataclass(frozen=True)
class Parts:
    """What the commands work with, wired once by the daemon."""
    manager: BackendManager    # the running config, the backends, unloads
    scheduler: Scheduler       # loads (queue, model budget, GPUs)
    reporter: Reporter         # status, metrics, a model's status entry
    reloader: Reloader
    stop: Callable[[str], None]    # begins a clean shutdown, saying why


def _model_name(params):
    name = params.get("model_name")
    if name is None:
        raise ServiceError(errors.MISSING_PARAM, "params.model_name is required")
    if not isinstance(name, str) or not name:
        raise ServiceError(errors.BAD_PARAM, "params.model_name must be a non-empty string")
    if len(name) > bounds.MAX_NAME_LENGTH:
        raise ServiceError(errors.BAD_PARAM, f"params.model_name must be at most "
                                             f"{bounds.MAX_NAME_LENGTH} characters")
    return name


def status(parts, params, reply):
    """{"command": "status"} -> service_status, endpoints, and every model not unloaded.

    CLI: backend-mgmt status [--json]
    """
    reply.ok_json(parts.reporter.status_json())


def load_model(parts, params, reply):
    """{"command": "load-model", "params": {"model_name": N, "keep_alive": S?}}
    -> {"endpoint": ..., "protocols": [...], "model": {...}}

    Answers when the backend is ready, or with load_failed / startup_timeout / cancelled.
    CLI: backend-mgmt load-model NAME [--json]
    """
    name = _model_name(params)
    keep_alive = params.get("keep_alive")
    if keep_alive is not None:
        try:
            keep_alive = bounds.seconds(keep_alive, "params.keep_alive", forever=True)
        except ValueError as exc:
            raise ServiceError(errors.BAD_PARAM, f"{exc} (0: unload as soon as idle)") from None

    def done(backend, error):
        if error is not None:
            reply.fail(error)
        else:
            reply.ok({"model_name": backend.name, "endpoint": backend.endpoint,
                      "protocols": list(backend.protocols),
                      "model": parts.reporter.model_status(backend)})
    parts.scheduler.load(name, done, keep_alive=keep_alive)


def unload_model(parts, params, reply):
    """{"command": "unload-model", "params": {"model_name": N}} -> {"model_name", "last_exit"}

    Answers once the backend process is gone (SIGTERM, then SIGKILL after stop_timeout).
    CLI: backend-mgmt unload-model NAME [--json]
    """
    name = _model_name(params)

    def done(backend):
        reply.ok({"model_name": backend.name, "unloaded": True,
                  "last_exit": backend.last_exit.as_dict() if backend.last_exit else None})
    parts.manager.unload(name, done)


def park_model(parts, params, reply):
    """{"command": "park-model", "params": {"model_name": N}} -> {"model_name", "parked",
    "model"}

    Parks a ready model now (its process kept, its GPU memory released; see "Parking
    models"), pinned or not; answers once it is parked. A load-model or a handshake for it
    wakes it. Refused (bad_request) for a model without park: or one not ready; a park that
    fails unloads the model and answers park_failed.
    CLI: backend-mgmt park-model NAME [--json]
    """
    name = parts.manager.resolve(_model_name(params)).name      # a full name too

    def done(error):
        backend = parts.manager.registry.get(name)
        if error is not None or backend is None:
            reply.fail(ServiceError(errors.PARK_FAILED, f"model {name}: {error or 'gone'}"))
        else:
            reply.ok({"model_name": name, "parked": True,
                      "model": parts.reporter.model_status(backend)})
    parts.scheduler.park(name, done)


def list_models(parts, params, reply):
    """{"command": "list-models"} -> {"models": [every configured model, loaded or not]}

    CLI: backend-mgmt list-models [--json]
    """
    config, registry = parts.manager.config, parts.manager.registry
    models = []
    for spec in config.models.values():
        backend = registry.get(spec.name)
        models.append({
            "name": spec.name, "fullname": spec.fullname, "type": spec.type,
            "loaded": backend is not None and backend.state == states.READY,
            "state": backend.state if backend else "unloaded",
            "endpoint": backend.endpoint if backend and backend.state == states.READY else None,
            "default": spec.name == config.default_model,
        })
    reply.ok({"models": models})


def stop_service(parts, params, reply):
    """{"command": "stop-service"} -> {"stopping": true}, then a clean shutdown.

    CLI: backend-mgmt stop-service
    """
    reply.ok({"stopping": True, "models": len(parts.manager.registry.backends)})
    parts.stop(f"stop-service command from {reply.requester}")


def reload_config(parts, params, reply):
    """{"command": "reload-config"} -> {"changed", "added", "removed", "changed_models", ...}

    Re-reads and validates the config file; an invalid one is refused (code config_invalid,
    data.problems) and the running configuration stays. Loaded models whose definition did
    not change keep running; changed ones are restarted, removed ones unloaded.
    CLI: backend-mgmt reload-config (also: SIGHUP, systemctl reload backend-mgmt)
    """
    def done(outcome):
        if isinstance(outcome, ServiceError):
            reply.fail(outcome)
        else:
            reply.ok(outcome.as_dict())
    parts.reloader.reload(done, "reload-config command")


def metrics_command(parts, params, reply):
    """{"command": "metrics"} -> {"text": "<Prometheus text exposition format>"}

    CLI: backend-mgmt metrics (prints the text; --output FILE writes it atomically, for the
    node exporter's textfile collector)
    """
    reply.ok({"text": parts.reporter.metrics_text(), "content_type": "text/plain; version=0.0.4"})


# Commands that change something: each is logged with who asked (peers.py).
CHANGING = frozenset({"load-model", "unload-model", "park-model", "stop-service",
                      "reload-config"})

COMMANDS = {
    "status": status,
    "load-model": load_model,
    "unload-model": unload_model,
    "park-model": park_model,
    "list-models": list_models,
    "stop-service": stop_service,
    "reload-config": reload_config,
    "metrics": metrics_command,
}
