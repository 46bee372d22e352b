import json
import os
import subprocess
import sys

import pytest

from backend_mgmt import config

# The original management service's config.json, byte for byte (its l4m/deepseek scripts are
# not part of it: the test checks the commands it builds, it does not run them).
FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures",
                       "original-config.json")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = os.path.join(REPO, "etc", "backend-mgmt", "config.yaml")


def original():
    with open(FIXTURE) as stream:
        return json.load(stream)


def problems(document):
    with pytest.raises(config.ConfigError) as caught:
        config.from_document(document, "cfg.json")
    return caught.value.problems


def test_original_config_loads_unchanged():
    cfg = config.load(FIXTURE)
    spec = cfg.models["Llama-3.1-8B-Instruct"]
    assert spec.fullname == "meta-llama/Llama-3.1-8B-Instruct"
    assert spec.type == "llama3"
    # The original form runs the script with the daemon's interpreter from backend_path.
    assert spec.command == (sys.executable,
                            os.path.join(os.path.dirname(os.path.abspath(FIXTURE)),
                                         "l4m_backend.py"))
    assert cfg.models["DeepSeek-R1-0528-Qwen3-8B"].type == "qwen3"
    assert cfg.cli_management == "ipc:///tmp/symphony-cli"
    assert cfg.client_handshake == "ipc:///tmp/symphony-ipc"
    assert cfg.log_level == "INFO"


def test_backend_path_overrides_script_directory():
    cfg = config.load(FIXTURE, backend_path="/opt/backends")
    assert cfg.models["Llama-3.2-1B-Instruct"].command[1] == "/opt/backends/l4m_backend.py"


def test_shipped_default_config_is_valid():
    cfg = config.load(SHIPPED)
    assert cfg.default_model in cfg.models
    spec = cfg.models[cfg.default_model]
    assert spec.command[:3] == (sys.executable, "-m", "backend_mgmt.reference_backend")


def test_misspelled_top_level_key_names_the_intended_one():
    document = original()
    document["modle_backends"] = document.pop("model_backends")
    lines = problems(document)
    assert "cfg.json: modle_backends: unknown key; did you mean 'model_backends'?" in lines
    assert "cfg.json: model_backends: missing (required)" in lines


def test_model_type_without_backend():
    document = original()
    document["supported_models"][1]["type"] = "llama4"
    assert problems(document) == [
        "cfg.json: supported_models[1].type: no backend for model type 'llama4' in "
        "model_backends (has: llama3, deepseek, qwen3); did you mean 'llama3'?"]


def test_every_problem_is_reported_with_its_path():
    document = original()
    document["supported_models"][0]["name"] = 5
    document["supported_models"][2].pop("type")
    document["launcher"] = "sytemd"
    document["endpoints"]["cli_management"] = "/tmp/x"
    document["model_backends"]["x"] = {"command": [], "startup_timeout": -1, "colour": 1}
    lines = problems(document)
    expected = [
        "cfg.json: endpoints.cli_management: \"/tmp/x\" is not in the expected form "
        "(ipc://PATH or tcp://HOST:PORT)",
        "cfg.json: launcher: \"sytemd\" is not one of: auto, systemd, process; "
        "did you mean 'systemd'?",
        "cfg.json: model_backends.x.colour: unknown key (known keys: command, env, liveness, "
        "park, resources, restart, startup_timeout, stop_timeout)",
        "cfg.json: model_backends.x.command: must not be empty",
        "cfg.json: model_backends.x.startup_timeout: must be greater than 0, got -1",
        "cfg.json: supported_models[0].name: expected string, got integer 5",
        "cfg.json: supported_models[2].type: missing (required)",
    ]
    assert lines == expected


def test_duplicate_and_case_only_duplicate_names():
    document = original()
    document["supported_models"].append(dict(document["supported_models"][0]))
    document["supported_models"].append({**document["supported_models"][1],
                                         "name": "llama-3.2-1b-instruct"})
    lines = problems(document)
    assert any("supported_models[3].name" in line and "the same name" in line for line in lines)
    assert any("supported_models[4].name" in line and "differing only in case" in line
               for line in lines)


def test_default_model_must_exist():
    document = original()
    document["default_model"] = "llama-3.1-8b-instruct"
    assert problems(document) == [
        "cfg.json: default_model: unknown model 'llama-3.1-8b-instruct'; did you mean: "
        "Llama-3.1-8B-Instruct (not in supported_models)"]


def test_not_an_object():
    assert "got array" in problems([1, 2])[0]
    assert "got empty" in problems(None)[0]


def test_yaml_syntax_error_names_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model_backends:\n  a: [unclosed\nsupported_models: []\n")
    with pytest.raises(config.ConfigError) as caught:
        config.load(str(path))
    assert caught.value.problems[0].startswith(f"{path}: not valid YAML: line ")


def test_format_is_chosen_by_content(tmp_path):
    path = tmp_path / "config.yaml"          # JSON in a .yaml file
    path.write_text(json.dumps(original()))
    assert len(config.load(str(path)).models) == 3
    bad = tmp_path / "config.json"
    bad.write_text('{"model_backends": {,}')
    with pytest.raises(config.ConfigError) as caught:
        config.load(str(bad))
    assert "not valid JSON" in caught.value.problems[0]


def test_missing_file():
    with pytest.raises(config.ConfigError) as caught:
        config.load("/nonexistent/config.yaml")
    assert caught.value.problems == ["/nonexistent/config.yaml: cannot read: "
                                     "No such file or directory"]


def test_per_model_overrides_merge_over_the_type():
    document = {
        "model_backends": {"t": {"command": ["{python}", "serve.py"], "env": {"A": "1", "B": 2},
                                 "startup_timeout": 30, "resources": {"gpus": [0, 1],
                                                                      "memory_max": "8G"}}},
        "supported_models": [{"name": "m", "type": "t", "env": {"B": "3"}, "args": ["--x"],
                              "stop_timeout": 4, "resources": {"memory_max": "4G"}}],
    }
    spec = config.from_document(document).models["m"]
    assert spec.command == (sys.executable, "serve.py", "--x")
    assert dict(spec.env) == {"A": "1", "B": "3"}
    assert (spec.startup_timeout, spec.stop_timeout) == (30.0, 4.0)
    assert spec.resources.gpus == "0,1" and spec.resources.memory_max == "4G"
    assert spec.fullname == "m"


def test_resolve_model_exact_fullname_and_case_hint():
    cfg = config.load(FIXTURE)
    assert cfg.resolve_model("Llama-3.1-8B-Instruct").name == "Llama-3.1-8B-Instruct"
    assert cfg.resolve_model("meta-llama/Llama-3.1-8B-Instruct").name == "Llama-3.1-8B-Instruct"
    with pytest.raises(LookupError, match="did you mean: Llama-3.1-8B-Instruct"):
        cfg.resolve_model("llama-3.1-8b-instruct")


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "backend_mgmt", *args], capture_output=True,
                          text=True, timeout=30, env={**os.environ, "PYTHONPATH": REPO})


def test_check_config_exit_codes(tmp_path):
    assert run_cli("check-config", "--config", FIXTURE).returncode == 0
    document = original()
    document["supported_models"][1]["type"] = "llama4"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(document))
    result = run_cli("check-config", "--config", str(bad))
    assert result.returncode == 78
    assert result.stderr.strip() == (f"{bad}: supported_models[1].type: no backend for model "
                                     f"type 'llama4' in model_backends (has: llama3, deepseek, "
                                     f"qwen3); did you mean 'llama3'?")


def test_serve_refuses_invalid_config_with_78(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model_backends: {}\nsupported_models: []\n")
    result = run_cli("serve", "--config", str(bad))
    assert result.returncode == 78
    assert "model_backends: must not be empty" in result.stderr


def minimal(**extra):
    return {"model_backends": {"t": {"command": ["x"]}},
            "supported_models": [{"name": "m", "type": "t"}], **extra}


@pytest.mark.parametrize("endpoint, refused", [
    ("tcp://0.0.0.0:5555", True), ("tcp://*:5555", True), ("tcp://192.0.2.7:5555", True),
    ("tcp://eth0:5555", True), ("tcp://[2001:db8::1]:5555", True),
    ("tcp://127.0.0.1:5555", False), ("tcp://localhost:5555", False),
    ("tcp://[::1]:5555", False), ("tcp://127.0.0.2:5555", False), ("ipc:///run/x", False)])
def test_remote_tcp_endpoints_need_an_explicit_opt_in(endpoint, refused):
    for key in ("cli_management", "client_handshake", "events"):
        found = config.validate(minimal(endpoints={key: endpoint}))
        if refused:
            assert found == [f"endpoints.{key}: {endpoint} listens on a non-loopback address "
                             f"({endpoint[6:].rsplit(':', 1)[0].strip('[]')}) without any "
                             f"authentication: anyone who reaches it may use it; use ipc:// "
                             f"or 127.0.0.1, or set access.allow_remote_tcp: true to accept "
                             f"that"], found
        else:
            assert found == [], found
        assert config.validate(minimal(endpoints={key: endpoint},
                                       access={"allow_remote_tcp": True})) == []


def test_limits_the_process_launcher_cannot_enforce_are_refused():
    document = minimal(launcher="process")
    document["supported_models"][0]["resources"] = {"memory_max": "1G", "cpu_quota": "50%"}
    assert config.validate(document) == [
        "supported_models[0].resources: memory_max, cpu_quota cannot be enforced with "
        "launcher: process (only transient units apply them); use launcher systemd or auto "
        "under systemd, or remove them"]
    document["launcher"] = "auto"
    assert config.validate(document) == []
    notes = config.unenforced_notes(config.from_document(document))
    assert len(notes) == 1 and "model m: resources memory_max, cpu_quota apply only" in notes[0]


def test_access_groups_default_and_can_be_set():
    access = config.from_document(minimal()).access
    assert (access.group, access.client_group, access.allow_remote_tcp) == \
        ("backend-mgmt", "backend-mgmt-clients", False)
    access = config.from_document(minimal(access={"group": "ops", "client_group": "ml"})).access
    assert (access.group, access.client_group) == ("ops", "ml")


# --- numbers from outside: finite and in range, or a problem line that names the field -----

NUMERIC_FIELDS = [
    # (path in the document, where it goes)
    ("handshake_timeout", lambda d, v: d.update(handshake_timeout=v)),
    ("keep_alive", lambda d, v: d.update(keep_alive=v)),
    ("model_backends.r.startup_timeout", lambda d, v: d["model_backends"]["r"].update(
        startup_timeout=v)),
    ("model_backends.r.stop_timeout", lambda d, v: d["model_backends"]["r"].update(
        stop_timeout=v)),
    ("model_backends.r.restart.backoff_initial", lambda d, v: d["model_backends"]["r"].update(
        restart={"backoff_initial": v})),
    ("model_backends.r.restart.backoff_max", lambda d, v: d["model_backends"]["r"].update(
        restart={"backoff_max": v})),
    ("model_backends.r.restart.window", lambda d, v: d["model_backends"]["r"].update(
        restart={"window": v})),
    ("model_backends.r.liveness.interval", lambda d, v: d["model_backends"]["r"].update(
        liveness={"interval": v})),
    ("model_backends.r.liveness.timeout", lambda d, v: d["model_backends"]["r"].update(
        liveness={"interval": 1, "timeout": v})),
    ("supported_models[0].keep_alive", lambda d, v: d["supported_models"][0].update(
        keep_alive=v)),
    ("supported_models[0].startup_timeout", lambda d, v: d["supported_models"][0].update(
        startup_timeout=v)),
]


def _numeric_document(path, value):
    document = {"model_backends": {"r": {"command": ["x"]}},
                "supported_models": [{"name": "a", "type": "r"}]}
    dict(NUMERIC_FIELDS)[path](document, value)
    return document


@pytest.mark.parametrize("path", [p for p, _ in NUMERIC_FIELDS])
@pytest.mark.parametrize("text", ["NaN", "Infinity", "-Infinity", "1e300", "31536001"])
def test_non_finite_and_huge_numbers_are_refused_naming_the_field(tmp_path, path, text):
    """JSON as Python reads it has NaN, Infinity and 1e300; YAML has .nan and .inf."""
    document = _numeric_document(path, "@VALUE@")
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps(document).replace('"@VALUE@"', text))
    with pytest.raises(config.ConfigError) as caught:
        config.load(str(config_file))
    problems = caught.value.problems
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{config_file}: {path}: must be "), problems
    assert "finite" in problems[0] or "at most 31536000" in problems[0], problems


@pytest.mark.parametrize("text,expected", [(".nan", "NaN"), (".inf", "Infinity"),
                                           ("-.inf", "-Infinity"), ("1.0e+300", "at most")])
def test_yaml_non_finite_numbers_are_refused(tmp_path, text, expected):
    config_file = tmp_path / "config.yaml"
    config_file.write_text("model_backends: {r: {command: [x]}}\n"
                           f"supported_models: [{{name: a, type: r, keep_alive: {text}}}]\n")
    with pytest.raises(config.ConfigError) as caught:
        config.load(str(config_file))
    assert caught.value.problems == [
        f"{config_file}: supported_models[0].keep_alive: must be "
        + ("at most 31536000 (365 days), got 1e+300" if expected == "at most"
           else f"a finite number, got {expected}")]


def test_liveness_interval_has_a_floor_and_a_year_is_the_ceiling():
    assert config.validate(_numeric_document("model_backends.r.liveness.interval", 0.001)) == [
        "model_backends.r.liveness.interval: must be at least 0.01, got 0.001"]
    for path, _ in NUMERIC_FIELDS:
        assert config.validate(_numeric_document(path, 31536000)) == [], path


def test_schema_limits_are_the_daemons():
    from backend_mgmt import bounds
    definitions = config.schema()["definitions"]
    assert definitions["seconds"]["maximum"] == bounds.MAX_SECONDS
    assert definitions["keep_alive"]["maximum"] == bounds.MAX_SECONDS
    interval = definitions["liveness"]["properties"]["interval"]["allOf"][1]["minimum"]
    assert interval == bounds.MIN_INTERVAL
