import shutil

import proptest  # noqa: F401  (the hypothesis profile: derandomized)
import pytest
from harness import Daemon, make_config, short_tempdir


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
