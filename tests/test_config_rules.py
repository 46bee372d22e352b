"""config.py in-process (fast: part of packaging/mutation-test): every key converted, every
kind of problem explained, what a reload sees as changed, where the CLI looks.

The problem lines are the README's promise ("one line per problem that names the file, the
field path, what is wrong and, where something close exists, what was meant"), written out.
"""

import datetime
import json
import os
import subprocess
import sys

import pytest

from backend_mgmt import config, isolation, placement
from backend_mgmt.config import Access, Config, Liveness, ModelSpec, Resources
from backend_mgmt.park_settings import ParkSettings
from backend_mgmt.policy import RestartPolicy


def minimal(**top):
    return {"model_backends": {"ref": {"command": ["x"]}},
            "supported_models": [{"name": "m", "type": "ref"}], **top}


def with_backend(**backend):
    return {"model_backends": {"ref": {"command": ["x"], **backend}},
            "supported_models": [{"name": "m", "type": "ref"}]}


def with_model(**model):
    return {"model_backends": {"ref": {"command": ["x"]}},
            "supported_models": [{"name": "m", "type": "ref", **model}]}


# -- conversion ---------------------------------------------------------------------------

FULL = {
    "model_backends": {
        "script": "run_backend.py",                            # the original form
        "ref": {
            "command": ["{python}", "-m", "ref"],
            "env": {"A": "1", "FLAG": True, "OFF": False, "N": 7},
            "startup_timeout": 30, "stop_timeout": 4,
            "restart": {"policy": "always", "backoff_initial": 2, "backoff_max": 20,
                        "max_restarts": 9, "window": 100},
            "liveness": {"interval": 5, "failures": 2},
            "resources": {"memory_max": "8G", "cpu_quota": "150%", "gpus": [0, 1],
                          "user": "nobody", "properties": {"Nice": 5, "IOWeight": "50"}},
            "park": {"command": {"park": ["ck", "--pid", "{pid}"], "wake": ["ck", "{unit}"]},
                     "timeout": 9},
        },
    },
    "supported_models": [
        {"name": "a", "fullname": "org/a", "type": "ref", "args": ["--x", "1"],
         "env": {"A": "2", "B": "b"}, "endpoint": "ipc:///tmp/a.sock", "startup_timeout": 60,
         "stop_timeout": 1.5, "resources": {"gpus": 2, "gpu_memory": "1GiB"},
         "restart": {"policy": False, "window": 50},
         "liveness": {"interval": 1, "timeout": 0.5, "failures": 4},
         "on_demand": False, "keep_alive": 30, "pinned": True, "park": "protocol",
         "park_after": 5},
        {"name": "b", "type": "script"},
        {"name": "e", "type": "ref", "resources": {"host_memory": "3GiB"}},
        {"name": "f", "type": "ref", "park": False},
    ],
    "endpoints": {"client_handshake": "ipc:///tmp/h.sock", "cli_management": "tcp://127.0.0.1:5555",
                  "events": "ipc:///tmp/e.sock"},
    "runtime_dir": "/tmp/run", "launcher": "auto", "default_model": "b",
    "logging": {"level": "debug", "format": "%(message)s", "date_format": "%H"},
    "access": {"group": "ops", "control_mode": "0600", "handshake_mode": "0666",
               "events_mode": "0640", "client_group": "ml", "allow_remote_tcp": True},
    "handshake_timeout": 12, "max_loaded_models": 3, "max_queue": 2, "preload": ["a"],
    "max_waiting_handshakes": 9, "max_waiting_handshakes_per_model": 4,
    "metrics": {"listen": "[::1]:9464", "allow_remote": True},
    "gpus": [0, {"id": 1, "memory": "2GiB"}, {"id": "GPU-x", "memory": 4000000000}],
    "on_demand": True, "keep_alive": 600, "park_after": 60, "host_memory": "512GiB",
}


def test_every_key_is_converted():
    cfg = config.from_document(json.loads(json.dumps(FULL)), "/etc/bm/config.yaml")
    a = ModelSpec(
        name="a", fullname="org/a", type="ref",
        command=(sys.executable, "-m", "ref", "--x", "1"),
        env=(("A", "2"), ("B", "b"), ("FLAG", "1"), ("N", "7"), ("OFF", "0")),
        endpoint="ipc:///tmp/a.sock", startup_timeout=60.0, stop_timeout=1.5,
        resources=Resources(memory_max="8G", cpu_quota="150%", gpus=None, gpu_count=2,
                            gpu_memory=1024 ** 3, user="nobody",
                            properties=(("IOWeight", "50"), ("Nice", "5"))),
        restart=RestartPolicy(policy="no", backoff_initial=2.0, backoff_max=20.0,
                              max_restarts=9, window=50.0),
        liveness=Liveness(interval=1.0, failures=4, timeout=0.5),
        on_demand=False, keep_alive=30.0, pinned=True,
        park=ParkSettings(method="protocol"), park_after=5.0, host_memory=2 * 1024 ** 3)
    b = ModelSpec(name="b", fullname="b", type="script",
                  command=(sys.executable, "/etc/bm/run_backend.py"),
                  on_demand=True, keep_alive=600.0, park_after=60.0)
    e_and_f = {"type": "ref", "command": (sys.executable, "-m", "ref"),
               "env": (("A", "1"), ("FLAG", "1"), ("N", "7"), ("OFF", "0")),
               "startup_timeout": 30.0, "stop_timeout": 4.0,
               "resources": Resources(memory_max="8G", cpu_quota="150%", gpus="0,1",
                                      user="nobody",
                                      properties=(("IOWeight", "50"), ("Nice", "5"))),
               "restart": RestartPolicy(policy="always", backoff_initial=2.0, backoff_max=20.0,
                                        max_restarts=9, window=100.0),
               "liveness": Liveness(interval=5.0, failures=2), "keep_alive": 600.0,
               "park_after": 60.0}
    e = ModelSpec(name="e", fullname="e", **e_and_f, host_memory=3 * 1024 ** 3,
                  park=ParkSettings(method="command", park_command=("ck", "--pid", "{pid}"),
                                    wake_command=("ck", "{unit}"), timeout=9.0))
    f = ModelSpec(name="f", fullname="f", **e_and_f)
    assert cfg.models == {"a": a, "b": b, "e": e, "f": f}
    assert list(cfg.models) == ["a", "b", "e", "f"]
    assert cfg == Config(
        path="/etc/bm/config.yaml", models=cfg.models,
        client_handshake="ipc:///tmp/h.sock", cli_management="tcp://127.0.0.1:5555",
        events="ipc:///tmp/e.sock", runtime_dir="/tmp/run", launcher="auto",
        default_model="b", log_level="DEBUG", log_format="%(message)s", log_date_format="%H",
        access=Access(group="ops", control_mode=0o600, handshake_mode=0o666,
                      events_mode=0o640, client_group="ml", allow_remote_tcp=True),
        handshake_timeout=12.0, max_loaded_models=3, max_queue=2, preload=("a",),
        max_waiting_handshakes=9, max_waiting_handshakes_per_model=4,
        metrics_listen=("::1", 9464),
        gpus=(placement.Gpu(0, None), placement.Gpu(1, 2 * 1024 ** 3),
              placement.Gpu("GPU-x", 4_000_000_000)), host_memory=512 * 1024 ** 3)


def test_defaults_of_a_minimal_config(tmp_path):
    cfg = config.from_document(minimal(), str(tmp_path / "c.yaml"))
    assert cfg == Config(path=str(tmp_path / "c.yaml"), models={"m": ModelSpec(
        name="m", fullname="m", type="ref", command=("x",))})
    spec = cfg.models["m"]
    assert (spec.startup_timeout, spec.stop_timeout, spec.keep_alive) == (120.0, 10.0, -1.0)
    assert spec.restart == RestartPolicy("on-failure", 1.0, 60.0, 5, 300.0)
    assert spec.liveness is None and spec.on_demand and not spec.pinned
    assert spec.resources == Resources()
    assert (cfg.launcher, cfg.log_level, cfg.handshake_timeout, cfg.max_queue) == \
        ("auto", "INFO", 300.0, 16)
    assert cfg.access == Access("backend-mgmt", 0o660, 0o660, 0o660)
    assert cfg.max_loaded_models is None and cfg.preload == () and cfg.gpus == ()


def test_fixed_gpu_lists_and_strings_and_a_liveness_without_timeout():
    cfg = config.from_document(with_backend(resources={"gpus": "0,1", "memory_max": 512},
                                            liveness={"interval": 2}), "<test>")
    spec = cfg.models["m"]
    assert spec.resources.gpus == "0,1" and spec.resources.gpu_count == 0
    assert spec.resources.memory_max == "512"
    assert spec.liveness == Liveness(interval=2.0, failures=3, timeout=None)
    assert cfg.path == "<test>"                      # a pseudo path is kept as it is


def test_backend_path_order(tmp_path):
    document = {"model_backends": {"t": "b.py"}, "supported_models": [{"name": "m", "type": "t"}]}
    here = str(tmp_path / "config.json")
    assert config.from_document(dict(document), here).models["m"].command[1] == \
        str(tmp_path / "b.py")
    assert config.from_document(dict(document, backend_path="/opt/b"), here) \
        .models["m"].command[1] == "/opt/b/b.py"
    assert config.from_document(dict(document, backend_path="/opt/b"), here,
                                backend_path="/srv").models["m"].command[1] == "/srv/b.py"


def test_park_protocol_as_a_mapping_without_timeout_takes_the_default():
    # README: `{protocol: true, timeout: S}`, `timeout` (default 60 s).
    spec = config.from_document(with_model(park={"protocol": True}), "/x.yaml").models["m"]
    assert spec.park == ParkSettings(method="protocol", timeout=60.0)


# -- problems -------------------------------------------------------------------------------

PROBLEMS = [
    # park: one method, known placeholders only (README "Parking models").
    (with_backend(park="sleep"),
     ['model_backends.ref.park: "sleep" is not one of: protocol, False']),
    (with_backend(park={"timeout": 5}),
     ["model_backends.ref.park: give either protocol: true or command: {park: [...], "
      "wake: [...]}"]),
    (with_backend(park={"protocol": True, "command": {"park": ["a"], "wake": ["b"]}}),
     ["model_backends.ref.park: give either protocol: true or command: {park: [...], "
      "wake: [...]}, not both"]),
    (with_backend(park={"command": {"park": ["ck", "--gpu={gpu}"], "wake": ["ck", "{PID}"]}}),
     ["model_backends.ref.park.command.park: argument 1 ('--gpu={gpu}') has an unknown "
      "placeholder {gpu}; only {pid}, {endpoint}, {unit} are substituted",
      "model_backends.ref.park.command.wake: argument 1 ('{PID}') has an unknown "
      "placeholder {PID}; only {pid}, {endpoint}, {unit} are substituted"]),
    # A model's own park: is checked too, after a backend's that is no mapping.
    ({"model_backends": {"ref": {"command": ["x"], "park": "protocol"}},
      "supported_models": [{"name": "m", "type": "ref", "park": {"timeout": 5}}]},
     ["supported_models[0].park: give either protocol: true or command: {park: [...], "
      "wake: [...]}"]),
    (with_backend(park={"command": {"park": ["ck"]}, "timeout": 0}),
     ["model_backends.ref.park.command.wake: missing (required)",
      "model_backends.ref.park.timeout: must be greater than 0, got 0"]),
    (minimal(host_memory="lots", park_after=-1),
     ["host_memory: 'lots' is not valid under any of the given schemas",
      "park_after: must be greater than 0, got -1"]),
    (minimal(modle_backends={}), ["modle_backends: unknown key; did you mean 'model_backends'?"]),
    (minimal(zzzzqqq=1), ["zzzzqqq: unknown key (known keys: access, backend_path, "
                          "default_model, endpoints, gpus, handshake_timeout, host_memory, "
                          "keep_alive, launcher, logging, max_loaded_models, max_queue, "
                          "max_waiting_handshakes, max_waiting_handshakes_per_model, metrics, "
                          "model_backends, on_demand, park_after, preload, runtime_dir, "
                          "supported_models)"]),
    (minimal(endpoints={"bad key": 1}),
     ['endpoints["bad key"]: unknown key (known keys: cli_management, client_handshake, '
      'events)']),
    ({"model_backends": {"ref": {"command": ["x"]}}}, ["supported_models: missing (required)"]),
    (minimal(max_queue="many"), ['max_queue: expected integer, got string "many"']),
    (minimal(max_queue=True), ["max_queue: expected integer, got boolean true"]),
    (minimal(max_queue=1.5), ["max_queue: expected integer, got number 1.5"]),
    (minimal(max_queue={}), ["max_queue: expected integer, got object {}"]),
    (minimal(handshake_timeout=[1, 2, 3]),
     ["handshake_timeout: expected number, got array [1, 2, 3]"]),
    (minimal(handshake_timeout=None), ["handshake_timeout: expected number, got null null"]),
    (minimal(launcher="x" * 100), ['launcher: "' + "x" * 56 + '... is not one of: auto, '
                                   'systemd, process']),
    (minimal(launcher="x" * 58), ['launcher: "' + "x" * 58 + '" is not one of: auto, '
                                  'systemd, process']),
    (minimal(launcher="proces"),
     ["launcher: \"proces\" is not one of: auto, systemd, process; did you mean 'process'?"]),
    (minimal(launcher="zzz"), ['launcher: "zzz" is not one of: auto, systemd, process']),
    (minimal(endpoints={"client_handshake": "http://x"}),
     ['endpoints.client_handshake: "http://x" is not in the expected form '
      '(ipc://PATH or tcp://HOST:PORT)']),
    (minimal(endpoints={"cli_management": "x"}),
     ['endpoints.cli_management: "x" is not in the expected form '
      '(ipc://PATH or tcp://HOST:PORT)']),
    (with_model(endpoint="foo"),
     ['supported_models[0].endpoint: "foo" is not in the expected form '
      '(ipc://PATH or tcp://HOST:PORT)']),
    (minimal(runtime_dir="relative/dir"),
     ['runtime_dir: "relative/dir" is not in the expected form (an absolute path)']),
    (with_backend(resources={"memory_max": "lots"}),
     ['model_backends.ref.resources.memory_max: "lots" is not in the expected form (bytes '
      "with an optional K, M, G or T suffix, or 'infinity')"]),
    (with_backend(resources={"cpu_quota": "2"}),
     ['model_backends.ref.resources.cpu_quota: "2" is not in the expected form '
      "(a percentage such as '200%')"]),
    (minimal(access={"control_mode": "rw"}),
     ['access.control_mode: "rw" is not in the expected form '
      "(octal file mode such as '0660')"]),
    (minimal(access={"handshake_mode": "999"}),
     ['access.handshake_mode: "999" is not in the expected form '
      "(octal file mode such as '0660')"]),
    (with_backend(env={"A=B": "x"}),
     ['model_backends.ref.env: "A=B" is not in the expected form (see the schema)']),
    ({"model_backends": {"ref": {"command": ["x"]}}, "supported_models": []},
     ["supported_models: must not be empty"]),
    (with_backend(command=[]), ["model_backends.ref.command: must not be empty"]),
    (with_model(name=""), ["supported_models[0].name: must not be empty"]),
    (with_backend(startup_timeout=0),
     ["model_backends.ref.startup_timeout: must be greater than 0, got 0"]),
    (minimal(preload=["M", "nope", "m"]),
     ["preload[0]: unknown model 'M'; did you mean: m (not in supported_models)",
      "preload[1]: unknown model 'nope' (not in supported_models)"]),
    (minimal(default_model="mm"),
     ["default_model: unknown model 'mm'; did you mean: m (not in supported_models)"]),
    (with_backend(env={1: "a"}), ["model_backends.ref.env: key 1 must be a string (quote it)"]),
    ({"model_backends": {"ref": {"command": ["x"]}},
      "supported_models": [{"name": "m", "type": "ref", "args": [{2: 3}]}]},
     ["supported_models[0].args[0]: key 2 must be a string (quote it)"]),
    ([1], ["(top level): expected an object with model_backends and supported_models, "
           "got array"]),
    (None, ["(top level): expected an object with model_backends and supported_models, "
            "got empty"]),
    ("text", ["(top level): expected an object with model_backends and supported_models, "
              "got string"]),
    (minimal(gpus=[0, 0]), ["gpus: GPU 0 is listed twice"]),
    (dict(with_model(resources={"gpus": 2}), gpus=[0]),
     ["supported_models[0].resources: needs 2 GPUs, the host has 1 (gpus:)"]),
    ({"model_backends": {"ref": {"command": ["x"]}},
      "supported_models": [{"name": "m", "type": "ref"}, {"name": "M", "type": "ref"},
                           {"name": "m", "type": "reff"}]},
     ["supported_models[1].name: 'M' has a name differing only in case as "
      "supported_models[0]",
      "supported_models[2].name: 'm' has the same name as supported_models[0]",
      "supported_models[2].type: no backend for model type 'reff' in model_backends "
      "(has: ref); did you mean 'ref'?"]),
    ({"model_backends": {"ref": {"command": ["x"]}, "llm": {"command": ["y"]}},
      "supported_models": [{"name": "m", "type": "zzzz"}]},
     ["supported_models[0].type: no backend for model type 'zzzz' in model_backends "
      "(has: ref, llm)"]),
]


@pytest.mark.parametrize("document, lines", PROBLEMS)
def test_each_problem_is_one_precise_line(document, lines):
    assert config.validate(document) == lines


def test_problems_are_sorted_by_field_path_and_name_the_file():
    document = minimal(launcher="zzz", max_queue="x", preload=["q"])
    document["supported_models"][0]["stop_timeout"] = "soon"
    with pytest.raises(config.ConfigError) as caught:
        config.from_document(document, "/etc/c.yaml")
    assert caught.value.problems == [
        '/etc/c.yaml: launcher: "zzz" is not one of: auto, systemd, process',
        '/etc/c.yaml: max_queue: expected integer, got string "x"',
        # the rules across fields run too, so one run reports everything
        "/etc/c.yaml: preload[0]: unknown model 'q' (not in supported_models)",
        '/etc/c.yaml: supported_models[0].stop_timeout: expected number, got string "soon"']
    assert str(caught.value) == "\n".join(caught.value.problems)    # one line per problem
    with pytest.raises(config.ConfigError) as caught:
        config.from_document(minimal(launcher="zzz"))
    assert caught.value.problems[0].startswith("<config>: launcher")
    assert config.from_document(minimal()).path == "<config>"


def test_format_path():
    assert config.format_path([]) == "(top level)"
    assert config.format_path(["a", 0, "b c", "d", 1]) == 'a[0]["b c"].d[1]'
    assert config.format_path([0, "x"]) == "[0].x"


def test_unknown_model_message():
    names = ["llama", "qwen-7b"]
    assert config.unknown_model_message("LLAMA", names) == \
        "unknown model 'LLAMA'; did you mean: llama"
    assert config.unknown_model_message("qwen-7", names) == \
        "unknown model 'qwen-7'; did you mean: qwen-7b"
    assert config.unknown_model_message("zzz", names) == "unknown model 'zzz'"
    assert config.unknown_model_message(5, names) == "unknown model '5'"


def test_schema_is_the_packaged_file():
    schema = config.schema()
    assert schema["type"] == "object"
    assert set(schema["required"]) == {"model_backends", "supported_models"}
    assert schema["additionalProperties"] is False


# -- reloads ---------------------------------------------------------------------------------

def convert(document):
    return config.from_document(json.loads(json.dumps(document)), "/etc/c.yaml")


def test_diff_of_identical_configs_is_empty():
    change = config.diff(convert(FULL), convert(FULL))
    assert change == config.ConfigChange() and not change.any
    assert change.as_dict() == {"changed": False, "added": [], "removed": [],
                                "changed_models": [], "settings": [], "need_restart": []}


def test_diff_names_models_settings_and_what_needs_a_restart():
    new = json.loads(json.dumps(FULL))
    new["supported_models"][1]["args"] = ["--changed"]           # b changed
    new["supported_models"].append({"name": "c", "type": "ref"})  # c added
    del new["supported_models"][0]                                # a removed
    new["preload"] = []
    del new["max_loaded_models"]
    new.update(default_model="c", logging={"level": "WARNING"}, handshake_timeout=1,
               max_queue=5, launcher="systemd", runtime_dir="/tmp/r2",
               endpoints={}, access={})
    change = config.diff(convert(FULL), convert(new))
    assert change.added == ("c",) and change.removed == ("a",) and change.changed == ("b",)
    assert change.settings == ("default_model", "log_level", "log_format", "log_date_format",
                               "handshake_timeout", "max_loaded_models", "max_queue",
                               "preload")
    assert change.need_restart == ("client_handshake", "cli_management", "events",
                                   "runtime_dir", "launcher", "access")
    assert change.any
    assert change.as_dict() == {
        "changed": True, "added": ["c"], "removed": ["a"], "changed_models": ["b"],
        "settings": list(change.settings), "need_restart": list(change.need_restart)}


@pytest.mark.parametrize("field", ["added", "removed", "changed", "settings", "need_restart"])
def test_any_single_difference_is_a_change(field):
    assert config.ConfigChange(**{field: ("x",)}).any


# -- reading ---------------------------------------------------------------------------------

def test_locations_tolerate_broken_files(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("endpoints: {cli_management: 'ipc:///x.sock'}\nruntime_dir: /r\n")
    assert config.locations(str(path)) == config.Locations("ipc:///x.sock", "/r")
    path.write_text("endpoints: [1]\nruntime_dir: 5\n")
    assert config.locations(str(path)) == config.Locations(None, None)
    path.write_text("endpoints: {cli_management: 7}\n")
    assert config.locations(str(path)) == config.Locations(None, None)
    path.write_text("- a list\n")
    assert config.locations(str(path)) == config.Locations()
    path.write_text("{broken")
    assert config.locations(str(path)) == config.Locations()
    assert config.locations(str(tmp_path / "missing")) == config.Locations()


def test_config_path_order(monkeypatch):
    monkeypatch.delenv("BACKEND_MGMT_CONFIG", raising=False)
    assert config.config_path() == "/etc/backend-mgmt/config.yaml"
    monkeypatch.setenv("BACKEND_MGMT_CONFIG", "/env.yaml")
    assert config.config_path() == "/env.yaml"
    assert config.config_path("/arg.yaml") == "/arg.yaml"
    monkeypatch.setenv("BACKEND_MGMT_CONFIG", "")
    assert config.config_path() == "/etc/backend-mgmt/config.yaml"


def test_from_validation_output():
    document = minimal()
    cfg = config.from_validation_output(json.dumps({"document": document}), "/c.yaml")
    assert cfg.models["m"].command == ("x",) and cfg.path == "/c.yaml"
    with pytest.raises(config.ConfigError) as caught:
        config.from_validation_output(json.dumps({"problems": ["/c.yaml: x: bad"]}), "/c.yaml")
    assert caught.value.problems == ["/c.yaml: x: bad"]
    with pytest.raises(config.ConfigError) as caught:
        config.from_validation_output("", "/c.yaml", detail="Traceback: boom")
    assert caught.value.problems == ["/c.yaml: could not validate: Traceback: boom"]
    with pytest.raises(config.ConfigError) as caught:
        config.from_validation_output("not json", "/c.yaml")
    assert caught.value.problems == ["/c.yaml: could not validate"]
    assert config.from_validated(document, "/c.yaml", backend_path="/b") == cfg


@pytest.fixture
def child_runs_the_mutant(monkeypatch):
    """Under packaging/mutation-test the isolated validation child (whose environment is
    otherwise clean) runs the same mutant; during mutmut's first pass, which records which
    tests reach which function, it must not try to record too (it has no mutmut set-up)."""
    mutant = os.environ.get("MUTANT_UNDER_TEST")
    if mutant is None:
        return
    run = subprocess.run

    def run_with_the_mutant(argv, **options):
        env = dict(options.pop("env", None) or os.environ)
        env["MUTANT_UNDER_TEST"] = "" if mutant == "stats" else mutant
        return run(argv, env=env, **options)
    monkeypatch.setattr(subprocess, "run", run_with_the_mutant)


def test_load_isolated_validates_in_a_child(tmp_path, child_runs_the_mutant):
    path = tmp_path / "c.yaml"
    path.write_text(json.dumps(minimal()))
    assert config.load_isolated(str(path)) == config.load(str(path))
    path.write_text(json.dumps(minimal(launcher="zzz")))
    with pytest.raises(config.ConfigError) as caught:
        config.load_isolated(str(path))
    assert caught.value.problems == [
        f'{path}: launcher: "zzz" is not one of: auto, systemd, process']
    with pytest.raises(config.ConfigError) as caught:
        config.load_isolated(str(tmp_path / "missing.yaml"))
    assert caught.value.problems[0].startswith(f"{tmp_path}/missing.yaml: cannot read")


def test_validation_command_reads_a_snapshot_and_names_the_file(tmp_path,
                                                                child_runs_the_mutant):
    """What a reload runs: the text comes from the snapshot, the problems name the file."""
    path, snapshot = tmp_path / "c.yaml", tmp_path / "snapshot"
    path.write_text(json.dumps(minimal()))
    snapshot.write_text(json.dumps(minimal(launcher="zzz")))
    command = config.validation_command(str(path), str(snapshot))
    assert command[-2:] == [str(path), str(snapshot)]
    result = subprocess.run(command, capture_output=True, timeout=60)
    assert result.returncode == 78
    assert config.validation_command(str(path))[-1] == str(path)
    with pytest.raises(config.ConfigError) as caught:
        config.from_validation_output(result.stdout, str(path))
    assert caught.value.problems == [
        f'{path}: launcher: "zzz" is not one of: auto, systemd, process']


def test_load_isolated_reports_a_child_that_cannot_run(tmp_path, monkeypatch):
    monkeypatch.setattr(config.sys, "executable", str(tmp_path / "no-python"))
    with pytest.raises(config.ConfigError) as caught:
        config.load_isolated(str(tmp_path / "c.yaml"))
    assert caught.value.problems[0].startswith(f"{tmp_path}/c.yaml: could not validate: ")
    monkeypatch.setattr(config.sys, "executable", "/bin/false")
    with pytest.raises(config.ConfigError) as caught:
        config.load_isolated(str(tmp_path / "c.yaml"))
    assert caught.value.problems == [f"{tmp_path}/c.yaml: could not validate"]
    assert os.path.exists("/bin/false")


# -- more of the same: what packaging/mutation-test showed untested --------------------------

MORE_PROBLEMS = [
    ({"model_backends": {}, "supported_models": [{"name": "m", "type": "ref"}]},
     ["model_backends: must not be empty",
      "supported_models[0].type: no backend for model type 'ref' in model_backends (has: "
      "none)"]),
    (minimal(max_queue=datetime.date(2024, 1, 2)),          # YAML reads an unquoted date
     ['max_queue: expected integer, got date "2024-01-02"']),
    ({"model_backends": {"ref": 5}, "supported_models": [{"name": "m", "type": "ref"}]},
     ["model_backends.ref: expected object, got integer 5",      # (the schema's if/then
      "model_backends.ref: expected string or object, got integer 5"]),   # adds a second)
    (minimal(launcher="x" * 59),                             # 61 characters of JSON: cut
     ['launcher: "' + "x" * 56 + '... is not one of: auto, systemd, process']),
    (minimal(logging={"level": "verbose"}),                  # both cases accepted, one shown
     ["logging.level: \"verbose\" is not one of: debug, info, warning, error, critical; "
      "did you mean 'error'?"]),
    (minimal(launcher="auxx"),                               # similarity 0.5: still a hint
     ["launcher: \"auxx\" is not one of: auto, systemd, process; did you mean 'auto'?"]),
    ({"model_backends": {"abcd": {"command": ["x"]}},
      "supported_models": [{"name": "m", "type": "abxy"}]},
     ["supported_models[0].type: no backend for model type 'abxy' in model_backends "
      "(has: abcd); did you mean 'abcd'?"]),
    (dict(with_backend(resources={"gpus": 2}), gpus=[0]),   # the backend's resources count
     ["supported_models[0].resources: needs 2 GPUs, the host has 1 (gpus:)"]),
    (dict(with_model(resources={"gpus": 1}), gpus=[0, 0]),
     ["gpus: GPU 0 is listed twice",
      "supported_models[0].resources: needs 1 GPU, the host has none (gpus:)"]),
    (dict(with_model(resources={"gpu_memory": "100GiB"}), gpus=[{"id": 0, "memory": "80GiB"}]),
     ["supported_models[0].resources: needs 100 GiB on each of 1 GPU(s), 0 GPU(s) in gpus: "
      "have that much"]),
    (dict(with_model(resources={"gpu_memory": "100GiB"}), gpus=[0]),
     ["supported_models[0].resources: needs 100 GiB of GPU memory but no GPU in gpus: "
      "declares its memory"]),
    (dict(with_model(resources={"gpus": [0, 1], "gpu_memory": "1GiB"}),
          gpus=[{"id": 0, "memory": "80GiB"}]), []),
    (dict(with_model(resources={"gpus": 0}), gpus=[]), []),
    (dict(with_model(resources={"gpus": 1}), gpus=[0]), []),   # a whole device: no memory asked
    (with_model(resources={"gpu_memory": 0}), []),   # 0 bytes on no placed device: no GPU
]


@pytest.mark.parametrize("document, lines", MORE_PROBLEMS)
def test_more_problem_lines(document, lines):
    assert config.validate(document) == lines


def test_the_validator_is_built_once(monkeypatch):
    monkeypatch.setattr(config, "_VALIDATOR", None)
    assert config.validate(minimal(launcher="zzz"))
    built = config._VALIDATOR
    assert built is not None
    assert config.validate(minimal()) == [] and config._VALIDATOR is built


def test_backend_level_settings_and_top_level_defaults_reach_the_model():
    document = with_backend(stop_timeout=4, startup_timeout=7)
    document.update(on_demand=False, keep_alive=9)
    spec = config.from_document(document, "<t>").models["m"]
    assert (spec.stop_timeout, spec.startup_timeout, spec.on_demand, spec.keep_alive) == \
        (4.0, 7.0, False, 9.0)


def test_backend_path_reaches_models_through_validation_output():
    document = {"model_backends": {"t": "b.py"}, "supported_models": [{"name": "m", "type": "t"}]}
    output = json.dumps({"document": document})
    assert config.from_validation_output(output, "/etc/c.yaml", "/srv").models["m"] \
        .command[1] == "/srv/b.py"
    assert config.from_validated(document, "/etc/c.yaml", "/srv").models["m"].command[1] == \
        "/srv/b.py"


def test_text_errors_name_line_and_column(tmp_path):
    with pytest.raises(config.ConfigError) as caught:
        config.parse_text("a: [1\nb: 2\n", "p")
    assert caught.value.problems == [
        "p: not valid YAML: line 2, column 2: expected ',' or ']', but got ':'"]
    for text in ('  {"a": [1,,]}', '[1,,]'):          # JSON by its first character
        with pytest.raises(config.ConfigError) as caught:
            config.parse_text(text, "p")
        assert caught.value.problems[0].startswith("p: not valid JSON: Expecting value")
    with pytest.raises(config.ConfigError) as caught:
        config.parse_text("a: b: c", "p")
    assert caught.value.problems == [
        "p: not valid YAML: line 1, column 5: mapping values are not allowed here"]
    path = tmp_path / "c.yaml"
    path.write_bytes(b"a: \xff\n")
    with pytest.raises(config.ConfigError) as caught:
        config.read(str(path))
    assert caught.value.problems[0].startswith(f"{path}: not UTF-8 text: ")


def test_load_isolated_reports_the_childs_last_line_and_its_timeout(tmp_path, monkeypatch):
    fake = tmp_path / "fake-python"
    fake.write_text("#!/bin/sh\necho first >&2\necho second >&2\n"
                    "printf 'last \\377\\n' >&2\nexit 3\n")
    fake.chmod(0o755)
    monkeypatch.setattr(config.sys, "executable", str(fake))
    with pytest.raises(config.ConfigError) as caught:
        config.load_isolated("/c.yaml")
    assert caught.value.problems == ["/c.yaml: could not validate: last \ufffd"]
    fake.write_text("#!/bin/sh\nexec sleep 30\n")
    with pytest.raises(config.ConfigError) as caught:
        config.load_isolated("/c.yaml", timeout=0.3)
    assert "timed out after 0.3 seconds" in caught.value.problems[0]


def test_load_isolated_passes_backend_path_on(tmp_path, child_runs_the_mutant):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"model_backends": {"t": "b.py"},
                                "supported_models": [{"name": "m", "type": "t"}]}))
    assert config.load_isolated(str(path), backend_path="/srv").models["m"].command[1] == \
        "/srv/b.py"



def test_describe_change_in_words():
    change = config.ConfigChange(added=("a", "b"), removed=("c",), changed=("d",),
                                 settings=("log_level",), need_restart=("access",))
    assert config.describe_change(change.as_dict()) == (
        "models added: a, b; models removed: c; models changed: d; settings changed: "
        "log_level; changed but needs a service restart: access")
    assert config.describe_change(config.ConfigChange().as_dict()) == "nothing changed"
    assert config.describe_change({"changed": True, "added": ["x"]}) == "models added: x"


@pytest.mark.parametrize("text, expected", [
    ("127.0.0.1:9464", ("127.0.0.1", 9464)), ("[::1]:0", ("::1", 0)),
    ("localhost:80", ("localhost", 80)),
    ("BOX:9464", ("BOX", 9464))])             # only brackets are taken off the host
def test_listen_address(text, expected):
    assert config.listen_address(text) == expected


@pytest.mark.parametrize("section, lines", [
    ({}, []), ({"listen": "127.0.0.1:9464"}, []), ({"listen": "[::1]:0"}, []),
    ({"listen": "127.0.0.1:65535"}, []),
    ({"listen": "127.0.0.1:65536"},
     ["metrics.listen: port 65536 is not between 0 (any free port) and 65535"]),
    ({"listen": "192.0.2.1:9464"},
     ["metrics.listen: 192.0.2.1 is not a loopback address, and the scrape target has no "
      "authentication; set metrics.allow_remote: true to serve it there anyway, or use "
      "127.0.0.1"]),
    ({"listen": "192.0.2.1:9464", "allow_remote": True}, []),
])
def test_metrics_listen_rules(section, lines):
    assert config.validate(minimal(metrics=section)) == lines


# -- what the merged security, hostile-input and operator code added (mutation survivors) ----

PROCESS_CANNOT = ("cannot be enforced with launcher: process (only transient units apply "
                  "them); use launcher systemd or auto under systemd, or remove them")


def test_the_process_launcher_refuses_limits_a_model_inherits_from_its_backend():
    # The model sets no resources of its own: the backend's still apply to it (README).
    document = with_backend(resources={"memory_max": "1G", "properties": {"Nice": 5}})
    document["launcher"] = "process"
    assert config.validate(document) == [
        f"supported_models[0].resources: memory_max, properties {PROCESS_CANNOT}"]


def test_launcher_auto_notes_unit_properties_as_enforced_only_by_units():
    document = with_model(resources={"properties": {"Nice": 5}})
    assert config.unenforced_notes(config.from_document(document)) == [
        "note: model m: resources properties apply only when backends run as transient "
        "units (launcher auto under systemd, or systemd); the process launcher does not "
        "enforce them"]
    document["launcher"] = "systemd"                    # units enforce them: nothing to say
    assert config.unenforced_notes(config.from_document(document)) == []


def test_a_fields_own_problem_comes_before_those_of_its_keys():
    # "sorted by field path": supported_models[0].resources before .resources.memory_max,
    # although "." sorts before ":" in the lines themselves.
    document = with_model(resources={"memory_max": "lots"})
    document["launcher"] = "process"
    assert config.validate(document) == [
        f"supported_models[0].resources: memory_max {PROCESS_CANNOT}",
        'supported_models[0].resources.memory_max: "lots" is not in the expected form (bytes '
        "with an optional K, M, G or T suffix, or 'infinity')"]


def test_a_boolean_gpu_count_is_only_the_schemas_problem():
    # The rules across fields run on a document the schema refused; true is no GPU count,
    # so no "needs 1 GPU" line joins the type error.
    assert config.validate(with_model(resources={"gpus": True})) == [
        "supported_models[0].resources.gpus: expected integer or string or array, "
        "got boolean true"]


@pytest.mark.parametrize("endpoint", ["tcp://lo:5555", "tcp://192.0.2.7;127.0.0.1:5555"])
def test_loopback_endpoints_need_no_opt_in(endpoint):
    # "lo" is the loopback interface by name; in tcp://source;destination libzmq binds the
    # destination, the part after the last ";".
    assert config.validate(minimal(endpoints={"cli_management": endpoint})) == []


def test_a_remote_destination_after_a_loopback_source_is_refused():
    endpoint = "tcp://127.0.0.1;0.0.0.0:5555"
    assert config.validate(minimal(endpoints={"events": endpoint})) == [
        f"endpoints.events: {endpoint} listens on a non-loopback address (0.0.0.0) without "
        f"any authentication: anyone who reaches it may use it; use ipc:// or 127.0.0.1, or "
        f"set access.allow_remote_tcp: true to accept that"]


def test_load_isolated_runs_the_child_in_a_clean_environment_in_the_root_directory(
        monkeypatch):
    # The daemon is root: its helpers get neither its environment nor its working directory
    # (isolation.py), so nothing planted there reaches the validation child.
    monkeypatch.setenv("BACKEND_MGMT_PLANTED", "1")
    seen = []

    def run(argv, **options):
        seen.append(options)
        return subprocess.CompletedProcess(argv, 0, json.dumps({"document": minimal()}), b"")
    monkeypatch.setattr(config.subprocess, "run", run)
    assert config.load_isolated("/c.yaml").models["m"].command == ("x",)
    [options] = seen
    assert options["cwd"] == "/"
    assert options["env"]["PATH"] == isolation.SAFE_PATH
    assert "BACKEND_MGMT_PLANTED" not in options["env"]


def test_load_isolated_validates_the_bytes_given_not_the_file(tmp_path, child_runs_the_mutant):
    # Start-up validates the bytes it read (README: validated bytes are not read twice).
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(minimal()))
    given = json.dumps(dict(minimal(), supported_models=[{"name": "given", "type": "ref"}]))
    cfg = config.load_isolated(str(path), data=given.encode())
    assert list(cfg.models) == ["given"]
