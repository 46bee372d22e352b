"""Bash completion (packaging/bash-completion/backend-mgmt), run in a real bash against the
real CLI and daemon. bash-completion's helpers may be absent here; the script works without
them (the system test checks it installed where Debian's bash-completion loads it)."""

import os
import shutil
import subprocess
import sys
import time

import pytest

from harness import REPO

SCRIPT = os.path.join(REPO, "packaging", "bash-completion", "backend-mgmt")
BASH = shutil.which("bash")
pytestmark = pytest.mark.skipif(BASH is None, reason="no bash")


def complete(line, env=None):
    """The words bash offers for ``line`` (the cursor at its end), and stderr."""
    words = line.split(" ")
    script = (f"source {SCRIPT}\n"
              f"COMP_WORDS=({' '.join(repr(w) for w in words)})\n"
              f"COMP_CWORD={len(words) - 1}\n"
              f"COMP_LINE={line!r}; COMP_POINT=${{#COMP_LINE}}\n"
              "_backend_mgmt backend-mgmt \"${COMP_WORDS[COMP_CWORD]}\" "
              "\"${COMP_WORDS[COMP_CWORD-1]}\"\n"
              "printf '%s\\n' \"${COMPREPLY[@]}\"\n"
              "complete -p backend-mgmt >&2\n")
    path = os.path.dirname(sys.executable) + ":" + os.environ["PATH"]
    result = subprocess.run([BASH, "--norc", "--noprofile", "-c", script], capture_output=True,
                            text=True, timeout=30,
                            env={**os.environ, "PATH": path, "PYTHONPATH": REPO, **(env or {})})
    assert result.returncode == 0, result.stderr
    return [w for w in result.stdout.splitlines() if w], result.stderr


def test_subcommands_and_their_options():
    offered, registered = complete("backend-mgmt lo")
    assert sorted(offered) == ["load-model", "logs"]
    assert "complete -F _backend_mgmt backend-mgmt" in registered
    assert "--keep-alive" in complete("backend-mgmt load-model --")[0]
    assert "--watch" in complete("backend-mgmt status --")[0]
    assert complete("backend-mgmt serve --log-level W")[0] == ["WARNING"]


def test_model_names_come_from_the_running_daemon(daemon_factory):
    daemon = daemon_factory({"alpha": [], "alps": [], "beta": []})
    offered, _ = complete(f"backend-mgmt --config {daemon.config_path} load-model al")
    assert sorted(offered) == ["alpha", "alps"]
    offered, _ = complete("backend-mgmt unload-model ",
                          env={"BACKEND_MGMT_CONFIG": daemon.config_path})
    assert sorted(offered) == ["alpha", "alps", "beta"]
    # Only the first argument is a model.
    assert complete(f"backend-mgmt load-model --config {daemon.config_path} alpha b")[0] == []


def test_no_daemon_means_no_names_quickly_and_silently(workdir):
    config = os.path.join(workdir, "config.yaml")
    with open(config, "w") as stream:
        stream.write(f"runtime_dir: {workdir}/run\nmodel_backends: {{t: t.py}}\n"
                     "supported_models: [{name: m, type: t}]\n")
    started = time.monotonic()
    offered, stderr = complete(f"backend-mgmt load-model --config {config} ")
    assert offered == []
    assert "backend-mgmt" not in stderr.replace("complete -F _backend_mgmt backend-mgmt", "")
    assert time.monotonic() - started < 5
