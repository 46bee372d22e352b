"""Fixtures for the booted-systemd system test (see nspawn.py).

Environment:
  BACKEND_MGMT_DEB=path            use this .deb instead of building one with packaging/build-deb
  BACKEND_MGMT_SYSTEST_REQUIRE=1   fail instead of skip when the machine cannot boot a container
                                   (CI sets it: there the test must really run)
  BACKEND_MGMT_SYSTEST_KEEP=1      keep the container's root after the run, for debugging
  BACKEND_MGMT_SYSTEST_CACHE=dir   where the debootstrapped base is cached
                                   (default /var/cache/backend-mgmt-systest)
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import nspawn
import pytest

REPO = Path(__file__).resolve().parents[2]

# Shorter than the shipped WatchdogSec=30 so that the frozen-daemon check takes
# seconds, not half a minute. Installed as a drop-in before the first boot, so
# every daemon start in the test runs under it.
TEST_WATCHDOG_SEC = 5

# The whole system test must stay under 10 minutes even when the daemon
# misbehaves: past this many seconds after boot, remaining checks fail at once.
TIME_BUDGET = 8 * 60


def pytest_configure(config):
    # Also registered in pyproject.toml; repeated so tests/system runs alone.
    config.addinivalue_line(
        "markers",
        "system: boots a real systemd in a container (slow; needs root and systemd-nspawn)")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    # Lets fixtures see whether the test failed (item.rep_call.failed).
    outcome = yield
    rep = outcome.get_result()
    setattr(item, f"rep_{rep.when}", rep)


def _cannot_run(reason: str):
    if os.environ.get("BACKEND_MGMT_SYSTEST_REQUIRE") == "1":
        pytest.fail(f"system test required (BACKEND_MGMT_SYSTEST_REQUIRE=1) but {reason}")
    pytest.skip(f"cannot boot a systemd container here: {reason}")


@pytest.fixture(scope="session")
def deb_path() -> Path:
    """The package under test: $BACKEND_MGMT_DEB, else freshly built from this tree."""
    problems = nspawn.missing_prerequisites()
    if problems:
        _cannot_run("; ".join(problems))
    given = os.environ.get("BACKEND_MGMT_DEB")
    if given:
        path = Path(given).resolve()
        if not path.is_file():
            pytest.fail(f"BACKEND_MGMT_DEB={given} does not exist")
        return path
    t0 = time.monotonic()
    res = subprocess.run([str(REPO / "packaging/build-deb")], capture_output=True, text=True,
                         timeout=600, stdin=subprocess.DEVNULL)
    if res.returncode != 0:
        pytest.fail(f"packaging/build-deb failed ({res.returncode}):\n{res.stderr[-6000:]}")
    path = Path(res.stdout.strip().splitlines()[-1])
    nspawn.log(f"built {path} in {time.monotonic() - t0:.0f}s")
    return path


def _prepare(c: nspawn.Container) -> None:
    """Before boot, in the container's root: users and the test's unit drop-in."""
    root = c.root
    env = {**nspawn.CONTAINER_ENV}
    # alice: an operator; carol: an inference client; bob: neither; mluser: the user a
    # model's backend runs as (resources.user), with a home it can plant files in.
    for argv in (["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin",
                  "--groups", "backend-mgmt", "alice"],
                 ["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", "bob"],
                 ["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin",
                  "--groups", "backend-mgmt-clients", "carol"],
                 ["useradd", "--create-home", "--shell", "/bin/sh", "mluser"]):
        subprocess.run(["chroot", str(root), *argv], check=True, env=env, timeout=60,
                       stdin=subprocess.DEVNULL)
    dropin = root / "etc/systemd/system/backend-mgmt.service.d/override.conf"
    dropin.parent.mkdir(parents=True, exist_ok=True)
    dropin.write_text(f"[Service]\nWatchdogSec={TEST_WATCHDOG_SEC}\n")


@pytest.fixture(scope="module")
def container(deb_path):
    """A booted container with the package installed (one for the whole module:
    the checks build on each other, like an administrator's session would)."""
    try:
        base = nspawn.ensure_base_root()
    except nspawn.ContainerError as exc:
        _cannot_run(f"could not debootstrap the base root: {exc}")
    c = nspawn.Container(base, debs=[deb_path], setup=_prepare)
    c.deb_inside = f"/var/tmp/{deb_path.name}"   # for the reinstall check
    c.watchdog_sec = TEST_WATCHDOG_SEC          # WatchdogSec= in effect for the service
    c.started_at = time.monotonic()
    with c:
        yield c
    stray = subprocess.run(["pgrep", "-f", f"systemd-nspawn .*-M {c.name}"], capture_output=True,
                           text=True, env=nspawn.HOST_ENV)
    assert not stray.stdout.strip(), f"systemd-nspawn left running: {stray.stdout}"


@pytest.fixture(autouse=True)
def journal_on_failure(request):
    """Enforce the time budget; when a test fails, show the daemon's and the backends' journal."""
    if "container" in request.fixturenames:
        c = request.getfixturevalue("container")
        spent = time.monotonic() - c.started_at
        if spent > TIME_BUDGET:
            pytest.fail(f"time budget used up ({spent:.0f}s of {TIME_BUDGET}s); "
                        f"not starting this check")
    yield
    rep = getattr(request.node, "rep_call", None)
    if rep is None or not rep.failed or "container" not in request.fixturenames:
        return
    c = request.getfixturevalue("container")
    if c.pid is None:
        print(c.console_tail())
        return
    res = c.run(["journalctl", "--no-pager", "-n", "150", "-u", "backend-mgmt.service",
                 "-u", "backend-mgmt-*"], check=False, timeout=30)
    print("---- journal (backend-mgmt*) ----\n" + res.stdout + res.stderr)
