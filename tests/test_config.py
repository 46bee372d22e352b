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
        "resources, restart, startup_timeout, stop_timeout)",
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
    assert any("supported_models[3].name" in l and "the same name" in l for l in lines)
    assert any("supported_models[4].name" in l and "differing only in case" in l for l in lines)


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
