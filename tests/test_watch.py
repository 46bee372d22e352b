"""status --watch against the real daemon: redrawn on each event, not by polling."""

import os
import signal
import subprocess
import sys
import time

from harness import REPO, wait_until


def test_the_view_is_redrawn_on_events_not_on_a_timer(daemon_factory, workdir):
    daemon = daemon_factory({"demo": []})
    output_path = os.path.join(workdir, "watch.out")
    with open(output_path, "w") as output:
        # --interval 60: any redraw within this test's bounds came from an event.
        watcher = subprocess.Popen(
            [sys.executable, "-m", "backend_mgmt", "status", "--watch", "--interval", "60",
             "--config", daemon.config_path],
            stdout=output, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": REPO})
    try:
        def text():
            with open(output_path) as stream:
                return stream.read()

        def ready_view():
            views = text().split("\n-- ")
            last = views[-1].splitlines()
            return any(line.startswith("demo") and " ready " in line for line in last)
        wait_until(lambda: "no models loaded" in text(), 10, 0.05, "the first view")
        started = time.monotonic()
        assert daemon.load("demo")["success"]
        wait_until(ready_view, 15, 0.05, "a view with demo ready")
        assert time.monotonic() - started < 15
        views = text().split("\n-- ")
        assert all(view.split("\n", 1)[0].split(" ", 1)[1].startswith("event: ")
                   for view in views[1:]), text()
        assert "demo ready" in text()
        # Ctrl-C ends it cleanly.
        watcher.send_signal(signal.SIGINT)
        assert watcher.wait(10) == 0
        assert "Traceback" not in text()
    finally:
        if watcher.poll() is None:
            watcher.kill()
            watcher.wait(5)


def test_watch_with_json_is_a_usage_error():
    result = subprocess.run([sys.executable, "-m", "backend_mgmt", "status", "--watch",
                             "--json"], capture_output=True, text=True, timeout=30,
                            env={**os.environ, "PYTHONPATH": REPO})
    assert result.returncode == 2 and result.stdout == ""
