import os

from backend_mgmt import metrics
from test_cli import cli


def parse(text):
    """Sample lines as {name{labels}: value}; checks every line is well-formed."""
    samples = {}
    for line in text.splitlines():
        if line.startswith("#"):
            assert line.startswith(("# HELP ", "# TYPE ")), line
            continue
        key, value = line.rsplit(" ", 1)
        samples[key] = float(value)
    return samples


def test_histogram_buckets_are_cumulative():
    histogram = metrics.Histogram(buckets=(0.1, 1.0))
    for seconds in (0.05, 0.5, 0.5, 5.0):
        histogram.observe("status", seconds)
    status = {"version": "x", "launcher": "process", "uptime": 1, "requests": {},
              "loads": {}, "counts": {}, "models": []}
    samples = parse(metrics.render(status, histogram, ["ready"]))
    name = "backend_mgmt_request_duration_seconds"
    assert samples[f'{name}_bucket{{command="status",le="0.1"}}'] == 1
    assert samples[f'{name}_bucket{{command="status",le="1"}}'] == 3
    assert samples[f'{name}_bucket{{command="status",le="+Inf"}}'] == 4
    assert samples[f'{name}_count{{command="status"}}'] == 4
    assert abs(samples[f'{name}_sum{{command="status"}}'] - 6.05) < 1e-6


def test_label_values_are_escaped():
    assert metrics.escape('a"b\\c\nd') == 'a\\"b\\\\c\\nd'


def test_metrics_of_a_running_daemon(daemon_factory, workdir):
    daemon = daemon_factory({"a": [], 'we"ird': ["--fail-at-start", "2"]})
    daemon.load("a")
    daemon.load('we"ird')
    for _ in range(3):
        daemon.request("status")
    samples = parse(daemon.request("metrics")["data"]["text"])
    assert samples['backend_mgmt_model_state{model="a",state="ready"}'] == 1
    assert samples['backend_mgmt_model_state{model="we\\"ird",state="failed"}'] == 1
    assert samples['backend_mgmt_models{state="ready"}'] == 1
    assert samples["backend_mgmt_loads_total"] == 2
    assert samples["backend_mgmt_load_failures_total"] == 1
    assert samples['backend_mgmt_request_duration_seconds_count{command="status"}'] >= 3
    assert samples['backend_mgmt_request_duration_seconds_count{command="load-model"}'] == 2
    output = os.path.join(workdir, "backend_mgmt.prom")
    result = cli("metrics", "--output", output, "--config", daemon.config_path)
    assert result.returncode == 0 and result.stdout == ""
    with open(output) as stream:
        assert "backend_mgmt_model_uptime_seconds{model=\"a\"}" in stream.read()
    # A directory that does not exist: one line that says so, no traceback, exit 73.
    missing = os.path.join(workdir, "no-such-dir", "backend_mgmt.prom")
    result = cli("metrics", "--output", missing, "--config", daemon.config_path)
    assert result.returncode == 73, result
    assert result.stderr == f"backend-mgmt: cannot write {missing}: No such file or directory\n"
