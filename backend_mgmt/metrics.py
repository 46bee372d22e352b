"""Prometheus text exposition of the daemon's state and request statistics. Pure."""

import bisect

# Seconds; control requests range from tens of microseconds (status) to minutes (load-model).
BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0,
           30.0, 120.0, 600.0)


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


def render(status, request_durations, states):
    """``status``: the status command's data; ``states``: every backend state name."""
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

    name = "backend_mgmt_request_duration_seconds"
    lines.append(f"# HELP {name} Control request latency, receipt to reply, by command.")
    lines.append(f"# TYPE {name} histogram")
    for command, series in sorted(request_durations.series.items()):
        label = f'command="{escape(command)}"'
        cumulative = 0
        for bound, count in zip(request_durations.buckets, series):
            cumulative += count
            lines.append(f'{name}_bucket{{{label},le="{bound:g}"}} {cumulative}')
        cumulative += series[len(request_durations.buckets)]
        lines.append(f'{name}_bucket{{{label},le="+Inf"}} {cumulative}')
        lines.append(f"{name}_sum{{{label}}} {series[-1]:.6f}")
        lines.append(f"{name}_count{{{label}}} {cumulative}")
    return "\n".join(lines) + "\n"
