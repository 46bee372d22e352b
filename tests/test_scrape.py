"""The Prometheus scrape target (scrape.py): the real daemon serving GET /metrics, fetched
with a real HTTP client and parsed by python3-prometheus-client's own text parser."""

import os
import socket
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from backend_mgmt import config
from harness import REPO, wait_until

MIB = 1024 * 1024


def scrape(url):
    with urllib.request.urlopen(url, timeout=10) as response:
        content_type = response.headers["Content-Type"]
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return content_type, samples


def test_metrics_are_served_over_http_with_usage_states_and_load_durations(daemon_factory):
    daemon = daemon_factory({"demo": ["--hold-memory", "64"], "idle": []},
                            metrics={"listen": "127.0.0.1:0"})
    url = daemon.request("status")["data"]["metrics_url"]
    assert url.startswith("http://127.0.0.1:") and url.endswith("/metrics")
    assert daemon.load("demo")["success"]

    def scraped_with_usage():
        content_type, samples = scrape(url)
        key = ("backend_mgmt_model_memory_bytes", (("model", "demo"),))
        return (content_type, samples) if key in samples else None
    content_type, samples = wait_until(scraped_with_usage, 20, 0.2, "usage in the scrape")
    assert content_type.startswith("text/plain; version=0.0.4")
    assert samples[("backend_mgmt_model_memory_bytes", (("model", "demo"),))] >= 64 * MIB
    assert samples[("backend_mgmt_model_cpu_seconds_total", (("model", "demo"),))] > 0
    assert samples[("backend_mgmt_model_state", (("model", "demo"), ("state", "ready")))] == 1
    assert samples[("backend_mgmt_model_restarts_total", (("model", "demo"),))] == 0
    assert samples[("backend_mgmt_model_load_duration_seconds_count",
                    (("model", "demo"),))] == 1
    assert samples[("backend_mgmt_loads_total", ())] == 1
    assert ("backend_mgmt_model_state", (("model", "idle"), ("state", "ready"))) not in samples
    # The same text as the metrics command (the existing way stays).
    assert "backend_mgmt_model_memory_bytes{model=\"demo\"}" in \
        daemon.request("metrics")["data"]["text"]


def test_a_stalled_scraper_holds_up_neither_the_daemon_nor_other_scrapers(daemon_factory):
    daemon = daemon_factory({"demo": []}, metrics={"listen": "127.0.0.1:0"})
    url = daemon.request("status")["data"]["metrics_url"]
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    stalled = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        stalled.sendall(b"GET /metr")           # and never the rest
        started = time.monotonic()
        assert daemon.request("status", timeout=2)["success"]
        assert daemon.load("demo")["success"]
        _, samples = scrape(url)
        assert samples[("backend_mgmt_model_state", (("model", "demo"), ("state", "ready")))] \
            == 1
        assert time.monotonic() - started < 5
    finally:
        stalled.close()
    # It stops with the daemon: nobody listens on the port any more (SO_REUSEADDR: closed
    # connections in TIME_WAIT do not count, a listener would).
    assert daemon.terminate() == 0
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(("127.0.0.1", port))
        probe.listen()


def test_without_metrics_listen_nothing_is_served(daemon_factory):
    daemon = daemon_factory({"demo": []})
    assert daemon.request("status")["data"]["metrics_url"] is None


def document(**metrics):
    return {"model_backends": {"t": "t.py"},
            "supported_models": [{"name": "m", "type": "t"}], "metrics": metrics}


@pytest.mark.parametrize("listen", ["0.0.0.0:9464", "192.0.2.1:9464", "[::]:9464",
                                    "metrics.example:9464"])
def test_a_non_loopback_address_needs_an_explicit_choice(listen):
    with pytest.raises(config.ConfigError) as caught:
        config.from_document(document(listen=listen), "cfg.json")
    assert "is not a loopback address" in caught.value.problems[0]
    assert "allow_remote" in caught.value.problems[0]
    chosen = config.from_document(document(listen=listen, allow_remote=True), "cfg.json")
    assert chosen.metrics_listen[1] == 9464


@pytest.mark.parametrize("listen, address", [("127.0.0.1:9464", ("127.0.0.1", 9464)),
                                             ("localhost:9100", ("localhost", 9100)),
                                             ("[::1]:9464", ("::1", 9464))])
def test_loopback_addresses_are_accepted(listen, address):
    assert config.from_document(document(listen=listen), "cfg.json").metrics_listen == address
    assert config.from_document(document(), "cfg.json").metrics_listen is None


@pytest.mark.parametrize("listen", ["9464", "127.0.0.1", "127.0.0.1:99999", "http://x:1"])
def test_a_malformed_listen_address_is_refused(listen):
    with pytest.raises(config.ConfigError) as caught:
        config.from_document(document(listen=listen), "cfg.json")
    assert "metrics.listen" in caught.value.problems[0]


def test_per_model_families_parse_with_the_library_parser():
    from backend_mgmt import metrics
    usage = {"memory_bytes": 64 * MIB, "cpu_seconds": 1.5, "gpu_memory_bytes": {"0": 2 * MIB},
             "source": "processes", "measured_at": "2026-11-29T09:00:00.000Z"}
    status = {"version": "x", "launcher": "process", "uptime": 1, "requests": {},
              "loads": {}, "counts": {"ready": 2},
              "models": [{"name": "a", "state": "ready", "uptime": 3, "restarts": 1,
                          "usage": usage},
                         {"name": "b", "state": "ready", "uptime": 1, "restarts": 0,
                          "usage": None}]}
    loads = metrics.Histogram(metrics.LOAD_BUCKETS)
    loads.observe("a", 0.3)
    text = metrics.render(status, metrics.Histogram(), ["ready"], loads, {"b": 2})
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    assert samples[("backend_mgmt_model_memory_bytes", (("model", "a"),))] == 64 * MIB
    assert samples[("backend_mgmt_model_cpu_seconds_total", (("model", "a"),))] == 1.5
    assert samples[("backend_mgmt_model_gpu_memory_bytes", (("gpu", "0"), ("model", "a")))] \
        == 2 * MIB
    assert ("backend_mgmt_model_memory_bytes", (("model", "b"),)) not in samples
    assert samples[("backend_mgmt_model_evictions_total", (("model", "b"),))] == 2
    assert samples[("backend_mgmt_model_load_duration_seconds_bucket",
                    (("le", "0.5"), ("model", "a")))] == 1
    assert samples[("backend_mgmt_model_load_duration_seconds_bucket",
                    (("le", "0.25"), ("model", "a")))] == 0


def test_evictions_and_load_durations_are_counted_per_model(daemon_factory):
    daemon = daemon_factory({"a": [], "b": []}, max_loaded_models=1)
    assert daemon.load("a")["success"]
    assert daemon.load("b")["success"]          # evicts a
    text = daemon.request("metrics")["data"]["text"]
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    assert samples[("backend_mgmt_model_evictions_total", (("model", "a"),))] == 1
    assert ("backend_mgmt_model_evictions_total", (("model", "b"),)) not in samples
    for model in ("a", "b"):
        assert samples[("backend_mgmt_model_load_duration_seconds_count",
                        (("model", model),))] == 1


def test_without_the_library_the_daemon_runs_and_says_why_it_does_not_serve(daemon_factory,
                                                                               workdir):
    # The package only recommends python3-prometheus-client: hide it from the daemon.
    shadow = os.path.join(workdir, "shadow", "prometheus_client")
    os.makedirs(shadow)
    with open(os.path.join(shadow, "__init__.py"), "w") as stream:
        stream.write("raise ImportError('hidden by the test')\n")
    daemon = daemon_factory({"demo": []}, metrics={"listen": "127.0.0.1:0"},
                            env={"PYTHONPATH": os.path.dirname(shadow) + os.pathsep + REPO})
    assert daemon.request("status")["data"]["metrics_url"] is None
    assert daemon.load("demo")["success"]
    assert "python3-prometheus-client is not installed" in daemon.log()
