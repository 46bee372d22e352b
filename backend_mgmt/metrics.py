"""Prometheus text exposition of the daemon's state and request statistics. Pure."""

import bisect

# Seconds; control requests range from tens of microseconds (status) to minutes (load-model).
BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0,
           30.0, 120.0, 600.0)
# Seconds a backend takes to become ready: a fraction of a second to many minutes.
LOAD_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)


class Histogram:
    """Cumulative-bucket histogram per label value (Prometheus semantics)."""

    def __init__(self, buckets=BUCKETS):
        self.buckets = buckets
        self.series = {}          # label value -> [bucket counts..., +Inf count, sum]

    def observe(self, label, seconds):
        series = self.series.get(label)
        if series is None:
            series = self.series[label] = [0] * (len(self.buckets) + 1) + [0.0]
        series[bisect.bisect_left(self.buckets, seconds)] += 1
        series[-1] += seconds


def escape(value):
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def render(status, request_durations, states, load_durations=None, evictions=None):
    """``status``: the status command's data; ``states``: every backend state name;
    ``load_durations``: a Histogram of start-to-ready seconds by model; ``evictions``:
    {model: count}."""
    lines = []

    def metric(name, kind, help_text, samples):
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            label_text = ",".join(f'{k}="{escape(v)}"' for k, v in labels.items())
            lines.append(f"{name}{{{label_text}}} {value}" if label_text else f"{name} {value}")

    models = status["models"]
    metric("backend_mgmt_info", "gauge", "Version of the running daemon.",
           [({"version": status["version"], "launcher": status["launcher"]}, 1)])
    metric("backend_mgmt_uptime_seconds", "gauge", "Seconds since the daemon started.",
           [({}, status["uptime"])])
    metric("backend_mgmt_requests_total", "counter", "Requests received, by socket.",
           [({"socket": kind}, count) for kind, count in sorted(status["requests"].items())
            if kind != "errors"])
    metric("backend_mgmt_request_errors_total", "counter",
           "Control and handshake requests answered with an error.",
           [({}, status["requests"].get("errors", 0))])
    for key, help_text in (("loads", "Backend starts for load-model."),
                           ("load_failures", "Loads that failed (exit, timeout, refusal)."),
                           ("restarts", "Restarts done by the restart policy."),
                           ("exits", "Backend process exits of any kind.")):
        metric(f"backend_mgmt_{key}_total", "counter", help_text,
               [({}, status["loads"].get(key, 0))])
    counts = status["counts"]
    metric("backend_mgmt_models", "gauge", "Models known to the daemon, by state.",
           [({"state": state}, counts.get(state, 0)) for state in states])
    metric("backend_mgmt_model_state", "gauge",
           "1 for each model's current state (models not loaded are absent).",
           [({"model": m["name"], "state": m["state"]}, 1) for m in models])
    metric("backend_mgmt_model_uptime_seconds", "gauge", "Seconds since the backend started.",
           [({"model": m["name"]}, m["uptime"]) for m in models])
    metric("backend_mgmt_model_restarts_total", "counter", "Restarts of each model's backend.",
           [({"model": m["name"]}, m["restarts"]) for m in models])

    usage = [(m["name"], m["usage"]) for m in models if m.get("usage")]
    metric("backend_mgmt_model_memory_bytes", "gauge",
           "Memory of each model's backend: its unit's control group, or the resident memory "
           "of its process tree.",
           [({"model": name}, u["memory_bytes"]) for name, u in usage
            if u["memory_bytes"] is not None])
    metric("backend_mgmt_model_cpu_seconds_total", "counter",
           "CPU time used by each model's backend (user and system).",
           [({"model": name}, u["cpu_seconds"]) for name, u in usage
            if u["cpu_seconds"] is not None])
    metric("backend_mgmt_model_gpu_memory_bytes", "gauge",
           "GPU memory used by each model's backend processes, by device (nvidia-smi).",
           [({"model": name, "gpu": gpu}, size) for name, u in usage
            for gpu, size in sorted((u["gpu_memory_bytes"] or {}).items())])
    metric("backend_mgmt_model_evictions_total", "counter",
           "Times each model was evicted to make room for another.",
           [({"model": model}, count) for model, count in sorted((evictions or {}).items())])

    def histogram(name, help_text, label_name, series_of):
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} histogram")
        for value, series in sorted(series_of.series.items()):
            label = f'{label_name}="{escape(value)}"'
            cumulative = 0
            for bound, count in zip(series_of.buckets, series):
                cumulative += count
                lines.append(f'{name}_bucket{{{label},le="{bound:g}"}} {cumulative}')
            cumulative += series[len(series_of.buckets)]
            lines.append(f'{name}_bucket{{{label},le="+Inf"}} {cumulative}')
            lines.append(f"{name}_sum{{{label}}} {series[-1]:.6f}")
            lines.append(f"{name}_count{{{label}}} {cumulative}")

    histogram("backend_mgmt_request_duration_seconds",
              "Control request latency, receipt to reply, by command.", "command",
              request_durations)
    if load_durations is not None:
        histogram("backend_mgmt_model_load_duration_seconds",
                  "Seconds from starting a model's backend to its answering the handshake.",
                  "model", load_durations)
    return "\n".join(lines) + "\n"
