"""The installed package under a real systemd (booted in a container).

Runs as an administrator would: install the .deb, start the service, use the
CLI as root, as a member of group backend-mgmt and as a stranger, load the
demo model, then crash, freeze and reinstall the daemon under it and check
that the backend keeps running, and finally stop the service.

The checks run in order on one container and build on each other, but each
first brings the service and the model to the state it needs, so one failure
does not hide the rest.

    sudo /usr/bin/python3 -m pytest tests/system -m system -v
"""

from __future__ import annotations

import json
import time

import pytest

from nspawn import Container, GiveUp, wait_until

pytestmark = pytest.mark.system

SERVICE = "backend-mgmt.service"
MODEL = "demo"
CLI_TIMEOUT = 10          # --timeout passed to the CLI
LOAD_TIMEOUT = 60         # load-model returns when the backend is ready (the demo: < 1 s)
RESTART_TIMEOUT = 45      # crash/watchdog -> restarted daemon answering again
ADOPT_GRACE = 5           # restarted daemon answering -> it lists the adopted model

EXIT_UNREACHABLE = 69


# --- helpers -------------------------------------------------------------------

def cli(c: Container, *args: str, user: str | None = None, timeout: float = 60):
    return c.run(["backend-mgmt", *args], check=False, user=user, timeout=timeout)


def cli_json(c: Container, *args: str, user: str | None = None, timeout: float = 60) -> dict:
    """Run a --json subcommand that must succeed; return its document's data."""
    res = cli(c, *args, "--json", "--timeout", str(CLI_TIMEOUT), user=user, timeout=timeout)
    assert res.returncode == 0, (f"backend-mgmt {' '.join(args)} --json exited {res.returncode}\n"
                                 f"stdout: {res.stdout}\nstderr: {res.stderr}")
    doc = json.loads(res.stdout)
    # The reply envelope ({"success": ..., "data": {...}}) or just its data.
    return doc.get("data", doc) if isinstance(doc, dict) else doc


def status(c: Container) -> dict:
    return cli_json(c, "status", timeout=CLI_TIMEOUT + 20)


def model_entry(c: Container, name: str = MODEL) -> dict | None:
    for m in status(c).get("models", []):
        if m.get("name") == name:
            return m
    return None


def ready_model(c: Container, name: str = MODEL) -> dict | None:
    """The model's status entry once the daemon answers and the model is ready
    (GiveUp if it failed: waiting longer will not help)."""
    m = model_entry(c, name)
    if m and m.get("state") == "failed":
        raise GiveUp(f"{name} is in state failed: {m}")
    return m if m and m.get("state", "ready") == "ready" else None


def model_back(c: Container, before: dict) -> dict:
    """After a daemon restart: the model's entry once the new daemon reports it ready.

    Gives up early when the new daemon answers but has not known the model for
    ADOPT_GRACE seconds: it lost it (rather than still adopting it).
    """
    first_answer: list[float] = []

    def check():
        m = model_entry(c)  # raises while the new daemon does not answer yet
        first_answer or first_answer.append(time.monotonic())
        if m is None and time.monotonic() - first_answer[0] > ADOPT_GRACE:
            raise GiveUp(f"the restarted daemon does not know {MODEL} any more "
                         f"(it had pid {before.get('pid')}, unit {before.get('unit')})")
        if m and m.get("state") == "failed":
            raise GiveUp(f"after the restart {MODEL} is in state failed: {m}")
        return m if m and m.get("state") == "ready" else None

    try:
        return wait_until(check, timeout=RESTART_TIMEOUT,
                          what=f"the restarted daemon to report {MODEL} ready")
    except GiveUp as exc:
        pytest.fail(str(exc))


def backend_units(c: Container) -> dict[str, str]:
    """Every loaded backend-mgmt-* unit (transient backend units) -> its states."""
    res = c.run(["systemctl", "list-units", "--all", "--plain", "--no-legend", "--no-pager",
                 "backend-mgmt-*"])
    units = {}
    for line in res.stdout.splitlines():
        fields = line.split()
        if fields:
            units[fields[0]] = " ".join(fields[1:4])  # LOAD ACTIVE SUB
    return units


def model_unit(c: Container, m: dict) -> str:
    """The transient unit running the model's backend."""
    if m.get("unit"):
        return m["unit"]
    units = [u for u, st in backend_units(c).items() if " active " in f" {st} "]
    assert len(units) == 1, f"status has no 'unit' for {m.get('name')} and units are {units}"
    return units[0]


def service(c: Container) -> dict[str, str]:
    return c.show(SERVICE, "ActiveState", "SubState", "MainPID", "NRestarts", "StatusText",
                  "Result", "WatchdogUSec")


def assert_adopted(again: dict, before: dict) -> None:
    """The README promises an adopted backend keeps its pid, endpoint and started_at."""
    for key in ("pid", "endpoint", "started_at"):
        assert again.get(key) == before.get(key), \
            f"adopted backend's {key} changed: {before.get(key)} -> {again.get(key)}"


def pid_alive(c: Container, pid: int) -> bool:
    return c.sh(f"kill -0 {int(pid)}", check=False).returncode == 0


def ensure_started(c: Container) -> None:
    if service(c)["ActiveState"] != "active":
        c.run(["systemctl", "reset-failed", SERVICE], check=False)
        c.run(["systemctl", "start", SERVICE], timeout=90)
    wait_until(lambda: status(c), timeout=30, what="the daemon to answer status")


def load(c: Container) -> None:
    """load-model demo; a failure is remembered so later checks fail at once
    instead of each waiting out the load timeout again."""
    if getattr(c, "load_failed", None):
        pytest.fail(f"{MODEL} could not be loaded earlier: {c.load_failed}")
    try:
        res = cli(c, "load-model", MODEL, "--json", "--timeout", str(LOAD_TIMEOUT),
                  timeout=LOAD_TIMEOUT + 30)
    except Exception as exc:
        c.load_failed = repr(exc)
        raise
    if res.returncode != 0:
        c.load_failed = f"load-model exited {res.returncode}: {res.stdout}{res.stderr}"
        pytest.fail(c.load_failed)


def wait_ready(c: Container, timeout: float = LOAD_TIMEOUT) -> dict:
    try:
        return wait_until(lambda: ready_model(c), timeout=timeout, what=f"{MODEL} ready")
    except GiveUp as exc:
        pytest.fail(str(exc))


def ensure_loaded(c: Container) -> dict:
    ensure_started(c)
    if getattr(c, "load_failed", None):
        pytest.fail(f"{MODEL} could not be loaded earlier: {c.load_failed}")
    if model_entry(c) is None:
        load(c)
    return wait_ready(c)


def restarted_since(c: Container, before: dict[str, str]):
    """The service's properties once it has restarted since `before` and is running again."""
    now = service(c)
    if (int(now["NRestarts"]) > int(before["NRestarts"])
            and now["MainPID"] not in ("0", before["MainPID"])
            and (now["ActiveState"], now["SubState"]) == ("active", "running")):
        return now
    return None


def journal_count(c: Container, unit: str, needle: str) -> int:
    res = c.run(["journalctl", "--no-pager", "-q", "-o", "cat", "-u", unit], timeout=30)
    return res.stdout.count(needle)


# --- the checks ------------------------------------------------------------------

def test_a_service_starts_and_reports_ready(container: Container):
    c = container
    # The installed unit passes systemd's own checks (no man in the container).
    res = c.run(["systemd-analyze", "verify", "--man=no", SERVICE], check=False)
    assert res.returncode == 0 and not res.stderr.strip(), f"unit verify: {res.stderr}"
    # Type=notify: start returns once the daemon sent READY=1, or fails.
    res = c.run(["systemctl", "start", SERVICE], check=False, timeout=90)
    assert res.returncode == 0, f"systemctl start failed: {res.stderr}"
    props = service(c)
    assert (props["ActiveState"], props["SubState"]) == ("active", "running"), props
    assert props["MainPID"] != "0"
    assert props["WatchdogUSec"] == f"{c.watchdog_sec}s", "the test's drop-in is not in effect"
    # STATUS= from the daemon (it may follow READY=1 by a moment).
    text = wait_until(lambda: service(c)["StatusText"], timeout=10, what="a StatusText")
    assert text.strip()
    # Still the same process a couple of watchdog periods later: it pings.
    pid = props["MainPID"]
    c.sh(f"sleep {c.watchdog_sec * 2}", timeout=c.watchdog_sec * 2 + 10)
    later = service(c)
    assert (later["ActiveState"], later["MainPID"], later["NRestarts"]) == \
        ("active", pid, props["NRestarts"]), f"the daemon did not keep its watchdog fed: {later}"
    # ExecReload (SIGHUP) re-reads the config in the same process.
    res = c.run(["systemctl", "reload", SERVICE], check=False, timeout=60)
    assert res.returncode == 0, f"systemctl reload failed: {res.stderr}"
    after = service(c)
    assert (after["ActiveState"], after["MainPID"]) == ("active", pid), f"after reload: {after}"
    wait_until(lambda: status(c), timeout=15, what="the daemon to answer after a reload")


def test_b_cli_access_by_group(container: Container):
    c = container
    ensure_started(c)
    # Runtime directory and control socket given to group backend-mgmt (also
    # after test_a's `systemctl reload`, which re-chowns the runtime directory).
    st = c.run(["stat", "-c", "%a %U %G", "/run/backend-mgmt"]).stdout.split()
    assert st == ["750", "root", "backend-mgmt"], f"/run/backend-mgmt is {st}"
    sock = c.run(["stat", "-c", "%a %G", "/run/backend-mgmt/control.sock"]).stdout.split()
    assert sock == ["660", "backend-mgmt"], f"control.sock is {sock}"

    # root
    data = cli_json(c, "status")
    assert "service_status" in data, data
    # a member of the group
    data = cli_json(c, "status", user="alice")
    assert "service_status" in data, data
    # anyone else is refused
    res = cli(c, "status", "--json", "--timeout", "5", user="bob", timeout=30)
    out = res.stdout + res.stderr
    assert res.returncode != 0, f"bob was let in: {out}"
    assert res.returncode == EXIT_UNREACHABLE or "ermission" in out, \
        f"bob: exit {res.returncode}, expected {EXIT_UNREACHABLE} or a permission error: {out}"


def test_c_load_model_as_transient_unit(container: Container):
    c = container
    ensure_started(c)
    load(c)
    m = wait_ready(c, timeout=30)
    assert m.get("endpoint"), m
    pid = int(m["pid"])
    assert pid > 0

    unit = model_unit(c, m)
    assert unit.startswith("backend-mgmt-"), unit
    props = c.show(unit, "ActiveState", "SubState", "MainPID", "MemoryMax", "ControlGroup")
    assert props["ActiveState"] == "active", props
    assert int(props["MainPID"]) == pid, f"status pid {pid} is not the unit's MainPID {props}"
    # resources.memory_max of the demo model, applied by systemd.
    assert props["MemoryMax"] not in ("", "infinity"), props
    # A separate control group from the daemon's: it outlives the daemon.
    assert SERVICE not in props["ControlGroup"], props

    # The backend's own output goes to the journal, under its unit (systemd's "Started ..."
    # line is there anyway: look for what the reference backend itself prints).
    wait_until(
        lambda: "reference-backend: listening on" in c.run(
            ["journalctl", "--no-pager", "-q", "-o", "cat", "-u", unit]).stdout,
        timeout=20, what=f"the backend's own lines in the journal of {unit}")


def test_d_daemon_crash_keeps_backend(container: Container):
    c = container
    m = ensure_loaded(c)
    before = service(c)
    c.sh(f"kill -KILL {int(before['MainPID'])}")
    after = wait_until(lambda: restarted_since(c, before), timeout=RESTART_TIMEOUT,
                       what="systemd to restart the killed daemon")
    again = model_back(c, m)
    assert_adopted(again, m)
    assert pid_alive(c, int(m["pid"]))
    assert after["MainPID"] != before["MainPID"]


def test_e_watchdog_restarts_frozen_daemon(container: Container):
    c = container
    m = ensure_loaded(c)
    before = service(c)
    timeouts = journal_count(c, SERVICE, "Watchdog timeout")
    c.sh(f"kill -STOP {int(before['MainPID'])}")
    wait_until(lambda: restarted_since(c, before), timeout=c.watchdog_sec + RESTART_TIMEOUT,
               what="the watchdog to restart the frozen daemon")
    assert journal_count(c, SERVICE, "Watchdog timeout") > timeouts, \
        "restarted, but not by the watchdog"
    again = model_back(c, m)
    assert_adopted(again, m)
    assert pid_alive(c, int(m["pid"]))


def test_f_package_reinstall_keeps_backend(container: Container):
    c = container
    m = ensure_loaded(c)
    before = service(c)
    # No network inside the booted container: dpkg -i the same package again.
    # Its postinst restarts the service (debhelper's restart-after-upgrade).
    res = c.run(["dpkg", "-i", c.deb_inside], check=False, timeout=240)
    assert res.returncode == 0, f"dpkg -i failed:\n{res.stdout}\n{res.stderr}"
    now = wait_until(lambda: (lambda p: p if p["ActiveState"] == "active"
                              and p["SubState"] == "running" else None)(service(c)),
                     timeout=RESTART_TIMEOUT, what="the service to run again after the reinstall")
    assert now["MainPID"] != before["MainPID"], "the reinstall did not restart the daemon"
    again = model_back(c, m)
    assert_adopted(again, m)
    assert pid_alive(c, int(m["pid"]))


def test_f2_backend_crash_in_its_unit_is_restarted_by_policy(container: Container):
    """The restart policy works with transient units: the unit's ExecStopPost= record of
    the crash reaches the daemon, which starts a new unit after the backoff."""
    c = container
    m = ensure_loaded(c)
    c.sh(f"kill -KILL {int(m['pid'])}")

    def restarted():
        entry = model_entry(c)
        if entry and entry.get("state") == "ready" and entry.get("pid") != m["pid"]:
            return entry
        return None
    again = wait_until(restarted, timeout=RESTART_TIMEOUT + 10,
                       what=f"{MODEL} restarted by its policy after its backend was killed")
    assert again["restarts"] == m.get("restarts", 0) + 1, again
    assert again["last_exit"]["signal"] == 9, again["last_exit"]
    assert not pid_alive(c, int(m["pid"]))


def test_f3_backend_dying_while_daemon_is_down_is_reported_not_adopted(container: Container):
    """Adoption state never grows stale: a unit that ends while no daemon watches is found
    failed by the next daemon (from its exit record), not adopted."""
    c = container
    m = ensure_loaded(c)
    before = service(c)
    # Freeze the daemon, kill the backend, then the daemon: the exit happens unwatched.
    c.sh(f"kill -STOP {int(before['MainPID'])}; kill -KILL {int(m['pid'])}; sleep 1; "
         f"kill -KILL {int(before['MainPID'])}")
    wait_until(lambda: restarted_since(c, before), timeout=RESTART_TIMEOUT,
               what="systemd to restart the killed daemon")

    def reported():
        entry = model_entry(c)
        return entry if entry and entry.get("state") in ("failed", "ready", "loading",
                                                         "restarting") else None
    entry = wait_until(reported, timeout=30, what=f"the new daemon to report {MODEL}")
    assert entry.get("pid") != m["pid"], entry
    if entry["state"] == "failed":
        assert "while the daemon was not running" in (entry.get("error") or ""), entry
    # Either way it is loadable again, and no stale unit is left behind.
    cli(c, "unload-model", MODEL, timeout=60)
    load(c)
    assert wait_ready(c, timeout=30)["pid"] != m["pid"]


def test_g_stop_stops_backends(container: Container):
    c = container
    m = ensure_loaded(c)
    res = c.run(["systemctl", "stop", SERVICE], check=False, timeout=150)
    assert res.returncode == 0, f"systemctl stop failed: {res.stderr}"
    props = service(c)
    assert props["ActiveState"] == "inactive", f"the daemon did not exit cleanly on SIGTERM: {props}"
    # The daemon stopped its backends before exiting; no unit is left loaded
    # (a stopped transient unit is unloaded by systemd's garbage collection
    # moments later; a failed one would stay).
    try:
        wait_until(lambda: not backend_units(c), timeout=10, what="no backend unit")
    except TimeoutError:
        pytest.fail(f"backend units left after stop: {backend_units(c)}")
    assert not pid_alive(c, int(m["pid"])), f"backend pid {m['pid']} still running"
