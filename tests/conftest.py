import os
import shutil
import subprocess
import sys

import proptest  # noqa: F401  (the hypothesis profile: derandomized)
import pytest
from harness import REPO, Daemon, make_config, short_tempdir, wait_until


@pytest.fixture
def make(tmp_path):
    """``make(models, **settings)``: a fakes.Core (manager and scheduler in-process, on a
    fake clock) for the in-process tests."""
    from fakes import Core

    def make_core(models, **settings):
        return Core(models, tmp_path, **settings)
    return make_core


@pytest.fixture
def workdir():
    directory = short_tempdir()
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def daemon_factory(workdir):
    """Start real daemons; every one is killed and cleaned up after the test."""
    started = []

    def start(models=None, env=None, wait=True, preamble=None, nofile=None, **extra):
        document = make_config(workdir, models=models, **extra)
        daemon = Daemon(document, directory=workdir, env=env, preamble=preamble, nofile=nofile)
        started.append(daemon)
        return daemon.start(wait=wait)
    yield start
    for daemon in started:
        daemon.close()


@pytest.fixture
def reference_backend(workdir):
    """Start reference backends: ``start(*options, model=...)`` -> (process, endpoint); each one
    is killed after the test (its socket file goes with ``workdir``)."""
    processes = []

    def start(*args, model="org/model"):
        endpoint = f"ipc://{workdir}/b{len(processes)}.sock"
        process = subprocess.Popen(
            [sys.executable, "-m", "backend_mgmt.reference_backend", "--ipc-endpoint", endpoint,
             "--model-name", model, *args], env={**os.environ, "PYTHONPATH": REPO},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        processes.append(process)
        wait_until(lambda: os.path.exists(endpoint[6:]) or process.poll() is not None, 10)
        return process, endpoint
    yield start
    for process in processes:
        process.kill()
        process.wait(5)
        process.stdout.close()
