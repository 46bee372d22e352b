"""Reading and validating the configuration.

``load(path)`` reads YAML or JSON (chosen by content), validates it against schema.json and a
few rules a schema cannot express, and returns a frozen ``Config``. Every problem becomes one
line ``<file>: <field path>: <what is wrong>[; did you mean '<x>'?]`` in a ``ConfigError``.
"""

import difflib
import ipaddress
import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass, field

from . import bounds, isolation, park_settings, placement
from .policy import RestartPolicy
from .sizes import parse_size

# jsonschema and yaml are imported where they are used: the daemon has its config validated
# by a short-lived child process (load_isolated), so it never loads them (about 7 MiB RSS).

DEFAULT_CONFIG_PATH = "/etc/backend-mgmt/config.yaml"
DEFAULT_RUNTIME_DIR = "/run/backend-mgmt"
DEFAULT_STARTUP_TIMEOUT = 120.0
DEFAULT_STOP_TIMEOUT = 10.0
DEFAULT_GROUP = "backend-mgmt"
DEFAULT_CLIENT_GROUP = "backend-mgmt-clients"
PYTHON_PLACEHOLDER = "{python}"  # in a command: the interpreter running the daemon


class ConfigError(Exception):
    """The configuration is invalid; ``problems`` has one line per problem."""

    def __init__(self, problems):
        super().__init__("\n".join(problems))
        self.problems = list(problems)


@dataclass(frozen=True)
class Resources:
    memory_max: str | None = None
    cpu_quota: str | None = None
    gpus: str | None = None          # fixed devices, as CUDA_VISIBLE_DEVICES wants: "0,1"
    gpu_count: int = 0               # or: this many devices placed by the daemon...
    gpu_memory: int = 0              # ...each with this many bytes free (0: whole devices)
    user: str | None = None
    properties: tuple = ()           # extra unit properties: ((name, value), ...)

    @property
    def need(self):
        """What placement must find for this model (placement.parse_need read the config)."""
        return placement.Need(count=self.gpu_count, memory=self.gpu_memory)


@dataclass(frozen=True)
class Liveness:
    interval: float
    failures: int = 3
    timeout: float | None = None     # default: the interval


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to run one model's backend; per-model overrides already applied."""
    name: str
    fullname: str
    type: str
    command: tuple
    env: tuple = ()                  # ((key, value), ...), sorted, so specs compare by value
    endpoint: str | None = None      # None: the daemon picks one under its runtime dir
    startup_timeout: float = DEFAULT_STARTUP_TIMEOUT
    stop_timeout: float = DEFAULT_STOP_TIMEOUT
    resources: Resources = field(default_factory=Resources)
    restart: RestartPolicy = field(default_factory=RestartPolicy)
    liveness: Liveness | None = None
    on_demand: bool = True           # a handshake for it may load it
    keep_alive: float = -1.0         # seconds idle before unloading; -1 never, 0 at once
    pinned: bool = False             # never evicted or unloaded for being idle
    park: park_settings.ParkSettings | None = None   # how it parks instead of unloading; None never
    park_after: float | None = None  # seconds idle before it is parked; None: not for idleness
    host_memory: int = 0             # bytes its weights take in host memory while parked


@dataclass(frozen=True)
class Access:
    group: str = DEFAULT_GROUP                    # operators: control and events sockets
    control_mode: int = 0o660
    handshake_mode: int = 0o660
    events_mode: int = 0o660
    client_group: str = DEFAULT_CLIENT_GROUP      # clients: handshake and backend endpoints
    allow_remote_tcp: bool = False


@dataclass(frozen=True)
class Config:
    path: str
    models: dict                     # name -> ModelSpec, in the order of supported_models
    client_handshake: str | None = None
    cli_management: str | None = None
    events: str | None = None
    runtime_dir: str | None = None
    launcher: str = "auto"
    default_model: str | None = None
    log_level: str = "INFO"
    log_format: str | None = None
    log_date_format: str | None = None
    access: Access = field(default_factory=Access)
    handshake_timeout: float = 300.0
    max_loaded_models: int | None = None
    max_queue: int = 16
    max_waiting_handshakes: int = 1024
    max_waiting_handshakes_per_model: int = 256
    preload: tuple = ()
    metrics_listen: tuple | None = None   # (host, port) of the scrape target, off if None
    gpus: tuple = ()                 # placement.Gpu, the host's GPUs for placement
    host_memory: int | None = None   # bytes for parked models' weights; None: no budget

    def resolve_model(self, name):
        """The ModelSpec for a requested name (exact name, else exact fullname).

        Raises LookupError with a message that says what was meant, if anything close exists.
        """
        spec = self.models.get(name)
        if spec is not None:
            return spec
        for spec in self.models.values():
            if spec.fullname == name:
                return spec
        raise LookupError(unknown_model_message(name, self.models))


def unknown_model_message(name, models):
    by_case = [known for known in models if known.lower() == str(name).lower()]
    if by_case:
        return f"unknown model '{name}'; did you mean: {by_case[0]}"
    close = difflib.get_close_matches(str(name), list(models), n=1, cutoff=0.6)
    hint = f"; did you mean: {close[0]}" if close else ""
    return f"unknown model '{name}'{hint}"


def schema():
    from importlib import resources as importlib_resources
    text = importlib_resources.files("backend_mgmt").joinpath("schema.json").read_text("utf-8")
    return json.loads(text)


_VALIDATOR = None


def _validator():
    global _VALIDATOR
    if _VALIDATOR is None:
        import jsonschema
        _VALIDATOR = jsonschema.Draft7Validator(schema())
    return _VALIDATOR


def load(path, backend_path=None):
    """Read, validate and convert the config at ``path``. Raises ConfigError."""
    return from_document(read(path), path, backend_path=backend_path)


def read(path, source=None):
    """The parsed document at ``path`` (not validated yet), or in ``source``, a copy of it
    (problems still name ``path``). Raises ConfigError."""
    try:
        with open(source or path, "rb") as stream:
            text = stream.read().decode("utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror}"]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path}: not UTF-8 text: {exc}"]) from None
    return parse_text(text, path)


def validation_command(path, snapshot=None):
    """The isolated child that validates ``path`` (``python -I -m backend_mgmt.validate``),
    reading its text from ``snapshot`` when given; it prints what from_validation_output
    reads. The daemon's reloads run it without blocking, load_isolated with a wait."""
    snapshot = () if snapshot is None else (snapshot,)
    return isolation.python_argv("backend_mgmt.validate", isolation.absolute(path), *snapshot)


def load_isolated(path, backend_path=None, timeout=60.0, data=None):
    """What ``load`` returns, with reading and validation done by a child process
    (``validation_command``) so that this process imports neither jsonschema nor yaml. The
    child hands back the validated document as JSON. With ``data``, the child validates those
    bytes (the file's, read by the caller), given on its stdin. Raises ConfigError."""
    source = None if data is None else "/dev/stdin"
    try:
        result = subprocess.run(validation_command(path, source), input=data,
                                capture_output=True, timeout=timeout,
                                env=isolation.clean_env(), cwd=isolation.WORKING_DIRECTORY)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ConfigError([f"{path}: could not validate: {exc}"]) from None
    last_error = result.stderr.decode("utf-8", "replace").strip().splitlines()[-1:]
    return from_validation_output(result.stdout, path, backend_path,
                                  detail=last_error[0] if last_error else "")


def from_validation_output(stdout, path, backend_path=None, detail=""):
    """The Config from what ``python -m backend_mgmt.validate PATH`` printed (used at start-up
    and by reloads, which run the child asynchronously). Raises ConfigError."""
    try:
        answer = json.loads(stdout)
    except ValueError:
        raise ConfigError([f"{path}: could not validate" +
                           (f": {detail}" if detail else "")]) from None
    if answer.get("problems"):
        raise ConfigError(answer["problems"])
    return from_validated(answer["document"], path, backend_path)


@dataclass(frozen=True)
class ConfigChange:
    """What differs between two configs (``diff``); pure data for the reload reply."""
    added: tuple = ()
    removed: tuple = ()
    changed: tuple = ()             # models whose definition differs
    settings: tuple = ()            # other keys that differ and take effect at once
    need_restart: tuple = ()        # keys that differ but only a service restart applies

    @property
    def any(self):
        return bool(self.added or self.removed or self.changed or self.settings or
                    self.need_restart)

    def as_dict(self):
        return {"changed": self.any, "added": list(self.added), "removed": list(self.removed),
                "changed_models": list(self.changed), "settings": list(self.settings),
                "need_restart": list(self.need_restart)}


def describe_change(data):
    """A reload's outcome in words, from ``ConfigChange.as_dict()`` (the reply's data)."""
    if not data.get("changed"):
        return "nothing changed"
    parts = [f"{label}: {', '.join(data[key])}" for key, label in (
        ("added", "models added"), ("removed", "models removed"),
        ("changed_models", "models changed"), ("settings", "settings changed"),
        ("need_restart", "changed but needs a service restart")) if data.get(key)]
    return "; ".join(parts)


LIVE_SETTINGS = ("default_model", "log_level", "log_format", "log_date_format",
                 "handshake_timeout", "max_loaded_models", "max_queue", "preload",
                 "max_waiting_handshakes", "max_waiting_handshakes_per_model")
RESTART_SETTINGS = ("client_handshake", "cli_management", "events", "runtime_dir", "launcher",
                    "access", "metrics_listen")


def diff(old, new):
    return ConfigChange(
        added=tuple(name for name in new.models if name not in old.models),
        removed=tuple(name for name in old.models if name not in new.models),
        changed=tuple(name for name in new.models
                      if name in old.models and new.models[name] != old.models[name]),
        settings=tuple(key for key in LIVE_SETTINGS if getattr(old, key) != getattr(new, key)),
        need_restart=tuple(key for key in RESTART_SETTINGS
                           if getattr(old, key) != getattr(new, key)),
    )


@dataclass(frozen=True)
class Locations:
    """Where the daemon's sockets are, as far as a config file says."""
    cli_management: str | None = None
    runtime_dir: str | None = None


def locations(path):
    """Read just the socket locations from ``path``, tolerating a file that is invalid or
    unreadable (the CLI must still find the daemon, e.g. to reload a config being fixed)."""
    try:
        document = read(path)
    except ConfigError:
        return Locations()
    if not isinstance(document, dict):
        return Locations()
    endpoints = document.get("endpoints")
    endpoint = endpoints.get("cli_management") if isinstance(endpoints, dict) else None
    directory = document.get("runtime_dir")
    return Locations(cli_management=endpoint if isinstance(endpoint, str) else None,
                     runtime_dir=directory if isinstance(directory, str) else None)


def from_validated(document, path, backend_path=None):
    """Convert a document that ``python -m backend_mgmt.validate`` has already accepted."""
    return _convert(document, path, backend_path)


def parse_text(text, path):
    """YAML or JSON, chosen by content: JSON when the text parses as JSON."""
    import yaml
    stripped = text.lstrip()
    if stripped.startswith(("{", "[")):
        try:
            return json.loads(text)
        except ValueError as json_error:
            # Could still be YAML flow style; report the JSON error if YAML fails too.
            try:
                return yaml.safe_load(text)
            except yaml.YAMLError:
                raise ConfigError([f"{path}: not valid JSON: {json_error}"]) from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([f"{path}: not valid YAML: {where}{problem}"]) from None


def from_unchanged(document, path, backend_path=None):
    """Convert a document parsed from bytes that passed validation before (validated.py): the
    daemon's own checks run again, only the schema's do not. Raises ConfigError."""
    problems = [f"{path}: {line}" for line in validate(document, schema=False)]
    if problems:
        raise ConfigError(problems)
    return _convert(document, path, backend_path)


def from_document(document, path="<config>", backend_path=None):
    """Validate an already parsed document and convert it. Raises ConfigError."""
    problems = [f"{path}: {line}" for line in validate(document)]
    if problems:
        raise ConfigError(problems)
    return _convert(document, path, backend_path)


def validate(document, schema=True):
    """All problems of a parsed document, as '<field path>: <message>' lines, sorted by path;
    without the schema's with ``schema=False``."""
    if not isinstance(document, dict):
        kind = "empty" if document is None else _json_type(document)
        return [f"(top level): expected an object with model_backends and supported_models, "
                f"got {kind}"]
    odd_keys = list(_non_string_keys(document, []))
    if odd_keys:
        # YAML allows keys like 1 or true; the checks below (and users) expect names.
        return [f"{format_path(path)}: key {key!r} must be a string (quote it)"
                for path, key in odd_keys]
    odd_numbers = list(_non_finite_numbers(document, []))
    if odd_numbers:
        # JSON as Python reads it (and YAML's .inf/.nan) has them; no timer can use them.
        return [f"{format_path(path)}: must be a finite number, got {_short(value)}"
                for path, value in odd_numbers]
    lines = []
    for error in _validator().iter_errors(document) if schema else ():
        lines.extend(_describe(error))
    # The rules across fields run even when the schema found problems, so that one run
    # reports everything. Where the parts they read are malformed they stop: the schema's
    # lines already say what is wrong there.
    try:
        lines.extend(_semantic_problems(document))
    except (KeyError, TypeError, AttributeError, ValueError, IndexError):
        pass
    return sorted(set(lines), key=_path_sort_key)


def _non_string_keys(value, path):
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                yield path, key
            else:
                yield from _non_string_keys(item, path + [key])
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _non_string_keys(item, path + [index])


def _non_finite_numbers(value, path):
    if isinstance(value, float) and not math.isfinite(value):
        yield path, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _non_finite_numbers(item, path + [key])
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _non_finite_numbers(item, path + [index])


def _path_sort_key(line):
    return line.split(": ", 1)[0], line


def format_path(parts):
    text = ""
    for part in parts:
        if isinstance(part, int):
            text += f"[{part}]"
        elif str(part).isidentifier():
            text += f".{part}" if text else str(part)
        else:
            text += f"[{json.dumps(part)}]"
    return text or "(top level)"


def _describe(error):
    """Turn one jsonschema error into precise lines."""
    path = list(error.absolute_path)
    where = format_path(path)
    validator = error.validator
    if validator == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        extra = [key for key in error.instance if key not in allowed]
        lines = []
        for key in extra:
            close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
            hint = f"; did you mean '{close[0]}'?" if close else (
                f" (known keys: {', '.join(allowed)})" if allowed else "")
            lines.append(f"{format_path(path + [key])}: unknown key{hint}")
        return lines
    if validator == "required":
        missing = [key for key in error.validator_value if key not in error.instance]
        return [f"{format_path(path + [key])}: missing (required)" for key in missing]
    if validator == "type":
        wanted = error.validator_value
        wanted = " or ".join(wanted) if isinstance(wanted, list) else wanted
        return [f"{where}: expected {wanted}, got {_json_type(error.instance)} "
                f"{_short(error.instance)}"]
    if validator == "enum":
        options = [str(option) for option in error.validator_value]
        close = difflib.get_close_matches(str(error.instance), options, n=1, cutoff=0.5)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        shown = ", ".join(dict.fromkeys(o for o in options if o == o.lower() or
                                        o.lower() not in options))
        return [f"{where}: {_short(error.instance)} is not one of: {shown}{hint}"]
    if validator == "pattern":
        return [f"{where}: {_short(error.instance)} is not in the expected form "
                f"({_pattern_hint(path)})"]
    if validator == "propertyNames":
        return [f"{where}: {_short(error.instance)}: {error.message}"]
    if validator in ("minItems", "minProperties", "minLength"):
        return [f"{where}: must not be empty"]
    if validator in ("maximum", "minimum"):
        bound = error.validator_value
        unit = " (365 days)" if bound == bounds.MAX_SECONDS else ""
        word = "most" if validator == "maximum" else "least"
        return [f"{where}: must be at {word} {bound}{unit}, got {_short(error.instance)}"]
    if validator == "exclusiveMinimum":
        return [f"{where}: must be greater than {error.validator_value}, got {error.instance}"]
    return [f"{where}: {error.message}"]


def _pattern_hint(path):
    last = next((p for p in reversed(path) if isinstance(p, str)), "")
    return {
        "client_handshake": "ipc://PATH or tcp://HOST:PORT",
        "cli_management": "ipc://PATH or tcp://HOST:PORT",
        "endpoint": "ipc://PATH or tcp://HOST:PORT",
        "runtime_dir": "an absolute path",
        "memory_max": "bytes with an optional K, M, G or T suffix, or 'infinity'",
        "cpu_quota": "a percentage such as '200%'",
        "control_mode": "octal file mode such as '0660'",
        "handshake_mode": "octal file mode such as '0660'",
    }.get(last, "see the schema")


def _semantic_problems(document):
    """Rules across fields, checked once the document has the right shape."""
    lines = []
    backends = document["model_backends"]
    seen = {}
    for index, model in enumerate(document["supported_models"]):
        model_type = model["type"]
        if model_type not in backends:
            close = difflib.get_close_matches(model_type, list(backends), n=1, cutoff=0.5)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            lines.append(f"supported_models[{index}].type: no backend for model type "
                         f"'{model_type}' in model_backends (has: {', '.join(backends) or 'none'})"
                         f"{hint}")
        folded = model["name"].lower()
        if folded in seen:
            first_index, first_name = seen[folded]
            same = ("the same name" if first_name == model["name"]
                    else "a name differing only in case")
            lines.append(f"supported_models[{index}].name: '{model['name']}' has {same} as "
                         f"supported_models[{first_index}]")
        else:
            seen[folded] = (index, model["name"])
    try:
        gpus = placement.parse_gpus(document.get("gpus", []))
    except ValueError as exc:
        lines.append(f"gpus: {str(exc).removeprefix('gpus: ')}")
        gpus = ()
    for index, model in enumerate(document["supported_models"]):
        resources = merged_resources(backends.get(model["type"]), model)
        need = placement.parse_need(resources)
        if need.devices:
            reason = placement.never_fits(gpus, need)
            if reason:
                lines.append(f"supported_models[{index}].resources: {reason}")
    names = [model["name"] for model in document["supported_models"]]
    for index, name in enumerate(document.get("preload", [])):
        if name not in names:
            lines.append(f"preload[{index}]: {unknown_model_message(name, names)} "
                         f"(not in supported_models)")
    lines.extend(_metrics_problems(document.get("metrics", {})))
    default = document.get("default_model")
    if default is not None and default not in names:
        lines.append(f"default_model: {unknown_model_message(default, names)} "
                     f"(not in supported_models)")
    lines.extend(_network_problems(document))
    lines.extend(_launcher_problems(document))
    lines.extend(_park_problems(document))
    return lines


def _park_problems(document):
    """``park:`` objects name exactly one method, and their commands only known placeholders."""
    sections = [(f"model_backends.{name}.park", backend.get("park"))
                for name, backend in document["model_backends"].items()
                if isinstance(backend, dict)]
    sections += [(f"supported_models[{index}].park", model.get("park"))
                 for index, model in enumerate(document["supported_models"])]
    lines = []
    for where, section in sections:
        if not isinstance(section, dict):
            continue
        methods = [key for key in ("protocol", "command") if key in section]
        if len(methods) != 1:
            lines.append(f"{where}: give either protocol: true or command: {{park: [...], "
                         f"wake: [...]}}" + (", not both" if methods else ""))
        for step, argv in (section.get("command") or {}).items():
            lines.extend(f"{where}.command.{step}: {problem}"
                         for problem in park_settings.template_problems(argv))
    return lines


def listen_address(text):
    """("127.0.0.1", 9464) from "127.0.0.1:9464", ("::1", 9464) from "[::1]:9464"."""
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def _tcp_host(endpoint):
    """The host of a tcp:// endpoint (without brackets, interface names as given), or None."""
    if not isinstance(endpoint, str) or not endpoint.startswith("tcp://"):
        return None
    address = endpoint[len("tcp://"):]
    address = address.rsplit(";", 1)[-1]          # tcp://source;destination: the destination
    host = address.rsplit(":", 1)[0] if ":" in address else address
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def is_loopback_host(host):
    if host in ("localhost", "lo"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _network_problems(document):
    """tcp:// control, handshake and events endpoints have no authentication: only loopback,
    unless access.allow_remote_tcp says the operator knows."""
    if document.get("access", {}).get("allow_remote_tcp") is True:
        return []
    lines = []
    for key in ("cli_management", "client_handshake", "events"):
        endpoint = document.get("endpoints", {}).get(key)
        host = _tcp_host(endpoint)
        if host is not None and not is_loopback_host(host):
            lines.append(f"endpoints.{key}: {endpoint} listens on a non-loopback address "
                         f"({host}) without any authentication: anyone who reaches it may use "
                         f"it; use ipc:// or 127.0.0.1, or set access.allow_remote_tcp: true "
                         f"to accept that")
    return lines


def _launcher_problems(document):
    """Resources only transient units enforce, asked of the process launcher."""
    if document.get("launcher") != "process":
        return []
    backends = document["model_backends"]
    lines = []
    for index, model in enumerate(document["supported_models"]):
        resources = merged_resources(backends.get(model["type"]), model)
        unenforced = [key for key in ("memory_max", "cpu_quota", "properties")
                      if resources.get(key)]
        if unenforced:
            lines.append(f"supported_models[{index}].resources: {', '.join(unenforced)} "
                         f"cannot be enforced with launcher: process (only transient units "
                         f"apply them); use launcher systemd or auto under systemd, or remove "
                         f"them")
    return lines


def unenforced_notes(cfg):
    """For check-config with launcher auto: models whose limits apply only under systemd."""
    if cfg.launcher != "auto":
        return []
    notes = []
    for spec in cfg.models.values():
        unenforced = [key for key, value in (("memory_max", spec.resources.memory_max),
                                              ("cpu_quota", spec.resources.cpu_quota),
                                              ("properties", spec.resources.properties))
                      if value]
        if unenforced:
            notes.append(f"note: model {spec.name}: resources {', '.join(unenforced)} apply "
                         f"only when backends run as transient units (launcher auto under "
                         f"systemd, or systemd); the process launcher does not enforce them")
    return notes


def _metrics_problems(section):
    if "listen" not in section:
        return []
    host, port = listen_address(section["listen"])
    if port > 65535:
        return [f"metrics.listen: port {port} is not between 0 (any free port) and 65535"]
    if not is_loopback_host(host) and not section.get("allow_remote", False):
        return [f"metrics.listen: {host} is not a loopback address, and the scrape target "
                f"has no authentication; set metrics.allow_remote: true to serve it there "
                f"anyway, or use 127.0.0.1"]
    return []


def _json_type(value):
    if value is None:
        return "null"
    return {bool: "boolean", int: "integer", float: "number", str: "string",
            list: "array", dict: "object"}.get(type(value), type(value).__name__)


def _short(value):
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def _convert(document, path, backend_path):
    base_dir = backend_path or document.get("backend_path") or os.path.dirname(
        os.path.abspath(path))
    backends = {}
    for type_name, definition in document["model_backends"].items():
        if isinstance(definition, str):
            # The original form: a script run with the daemon's own interpreter.
            definition = {"command": [PYTHON_PLACEHOLDER, os.path.join(base_dir, definition)]}
        backends[type_name] = definition
    models = {}
    for model in document["supported_models"]:
        backend = backends[model["type"]]
        env = {**backend.get("env", {}), **model.get("env", {})}
        resources = merged_resources(backend, model)
        command = [sys.executable if part == PYTHON_PLACEHOLDER else part
                   for part in backend["command"]] + list(model.get("args", []))
        models[model["name"]] = ModelSpec(
            name=model["name"],
            fullname=model.get("fullname", model["name"]),
            type=model["type"],
            command=tuple(command),
            env=tuple(sorted((key, _env_value(value)) for key, value in env.items())),
            endpoint=model.get("endpoint"),
            startup_timeout=float(model.get("startup_timeout",
                                            backend.get("startup_timeout",
                                                        DEFAULT_STARTUP_TIMEOUT))),
            stop_timeout=float(model.get("stop_timeout",
                                         backend.get("stop_timeout", DEFAULT_STOP_TIMEOUT))),
            resources=_resources(resources),
            restart=_restart({**backend.get("restart", {}), **model.get("restart", {})}),
            liveness=_liveness({**backend.get("liveness", {}), **model.get("liveness", {})}),
            on_demand=bool(model.get("on_demand", document.get("on_demand", True))),
            keep_alive=float(model.get("keep_alive", document.get("keep_alive", -1))),
            pinned=bool(model.get("pinned", False)),
            park=_park(model.get("park", backend.get("park"))),
            park_after=_optional_seconds(model.get("park_after", document.get("park_after"))),
            host_memory=_host_memory_need(resources),
        )
    endpoints = document.get("endpoints", {})
    logging_section = document.get("logging", {})
    access = document.get("access", {})
    return Config(
        path=os.path.abspath(path) if not path.startswith("<") else path,
        models=models,
        client_handshake=endpoints.get("client_handshake"),
        cli_management=endpoints.get("cli_management"),
        events=endpoints.get("events"),
        runtime_dir=document.get("runtime_dir"),
        launcher=document.get("launcher", "auto"),
        default_model=document.get("default_model"),
        log_level=logging_section.get("level", "INFO").upper(),
        log_format=logging_section.get("format"),
        log_date_format=logging_section.get("date_format"),
        access=Access(
            group=access.get("group", DEFAULT_GROUP),
            control_mode=int(access.get("control_mode", "0660"), 8),
            handshake_mode=int(access.get("handshake_mode", "0660"), 8),
            events_mode=int(access.get("events_mode", "0660"), 8),
            client_group=access.get("client_group", DEFAULT_CLIENT_GROUP),
            allow_remote_tcp=bool(access.get("allow_remote_tcp", False)),
        ),
        handshake_timeout=float(document.get("handshake_timeout", 300.0)),
        max_loaded_models=document.get("max_loaded_models"),
        max_queue=int(document.get("max_queue", 16)),
        max_waiting_handshakes=int(document.get("max_waiting_handshakes", 1024)),
        max_waiting_handshakes_per_model=int(document.get("max_waiting_handshakes_per_model",
                                                          256)),
        preload=tuple(document.get("preload", ())),
        metrics_listen=listen_address(document["metrics"]["listen"])
        if "listen" in document.get("metrics", {}) else None,
        gpus=placement.parse_gpus(document.get("gpus", [])),
        host_memory=parse_size(document["host_memory"]) if "host_memory" in document else None,
    )


def _park(section):
    """``park:`` as park_settings.ParkSettings; None when absent or false (never parked)."""
    if section is None or section is False:
        return None
    if section == park_settings.PROTOCOL:
        return park_settings.ParkSettings(method=park_settings.PROTOCOL)
    timeout = float(section.get("timeout", park_settings.DEFAULT_TIMEOUT))
    command = section.get("command")
    if command is None:
        return park_settings.ParkSettings(method=park_settings.PROTOCOL, timeout=timeout)
    return park_settings.ParkSettings(
        method=park_settings.COMMAND, park_command=tuple(command["park"]),
        wake_command=tuple(command["wake"]), timeout=timeout)


def _optional_seconds(value):
    return None if value is None else float(value)


def merged_resources(backend, model):
    """A model's resources: its backend type's, each key overridden by the model's own. The
    backend definition may be the original's script string (no resources) or, while the
    document is still being checked, missing (None)."""
    return {**(backend.get("resources", {}) if isinstance(backend, dict) else {}),
            **model.get("resources", {})}


def _host_memory_need(resources):
    """Bytes a parked model holds in host memory: resources.host_memory, else what it holds
    on its GPUs (each placed device's gpu_memory), else 0."""
    if "host_memory" in resources:
        return parse_size(resources["host_memory"])
    need = placement.parse_need(resources)
    return need.devices * need.memory


def _restart(section):
    defaults = RestartPolicy()
    policy = section.get("policy", defaults.policy)
    return RestartPolicy(
        policy="no" if policy is False else policy,
        backoff_initial=float(section.get("backoff_initial", defaults.backoff_initial)),
        backoff_max=float(section.get("backoff_max", defaults.backoff_max)),
        max_restarts=int(section.get("max_restarts", defaults.max_restarts)),
        window=float(section.get("window", defaults.window)),
    )


def _liveness(section):
    if not section:
        return None
    return Liveness(interval=float(section["interval"]),
                    failures=int(section.get("failures", 3)),
                    timeout=float(section["timeout"]) if "timeout" in section else None)


def _env_value(value):
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)


def _resources(section):
    need = placement.parse_need(section)
    gpus = section.get("gpus")
    if isinstance(gpus, int) and not isinstance(gpus, bool):
        gpus = None                  # a number of devices to place, not fixed ones
    elif isinstance(gpus, list):
        gpus = ",".join(str(gpu) for gpu in gpus)
    memory_max = section.get("memory_max")
    return Resources(
        memory_max=str(memory_max) if memory_max is not None else None,
        cpu_quota=section.get("cpu_quota"),
        gpus=gpus,
        gpu_count=need.count,
        gpu_memory=need.memory,
        user=section.get("user"),
        properties=tuple(sorted((k, str(v)) for k, v in section.get("properties", {}).items())),
    )


def config_path(explicit=None):
    """--config, else $BACKEND_MGMT_CONFIG, else the system default."""
    return explicit or os.environ.get("BACKEND_MGMT_CONFIG") or DEFAULT_CONFIG_PATH
