"""What the daemon reports about itself: the status command's data, each model's entry, the
Prometheus metrics, and the systemd STATUS= line; with the figures only reporting needs (load
durations, evictions) and the usage readings (usage.py) they show.
"""

import os
import socket

from . import __version__, metrics, placement, states
from .registry import backend_changes, iso_time
from .wire import to_json


# A stand-in for each figure of the head that moves per request, in its kept text; no string
# the head shows is this one (its strings are names, paths and endpoints: no NUL in them).
_FIGURE = "\0backend-mgmt figure\0"


def seconds_text(seconds):
    """A duration as status_data() gives it, round(seconds, 3), in the text JSON writes for
    that float ("12.5", "0.0"); at less than half the cost, as status_json fills one in for
    each model per request. The same digits: round() rounds with the same correctly rounded
    conversion as "%.3f", and for a duration (under 10^12 s) no shorter decimal than those
    three places names the same float."""
    text = f"{seconds:.3f}".rstrip("0")
    return text + "0" if text[-1] == "." else text


def usage_targets(registry):
    """{name: (pid, unit)} of every backend whose process runs, for usage.py."""
    return {b.name: (b.pid, b.unit) for b in registry.backends.values() if b.process_alive}


class Reporter:
    """``endpoints``: {"client", "cli", "events"} as served; ``requests``: the daemon's
    request counters; ``request_durations``: the control endpoint's metrics.Histogram;
    ``guard``: the ConnectionGuard (connections, budget, resets); ``usage``: the UsageMonitor;
    ``launcher_name``; ``metrics_url()``: where metrics are served, or None;
    ``stopping()``: true once the service shuts down; ``loop``: its clock() and wall_clock()
    are the times reported."""

    def __init__(self, loop, manager, scheduler, usage, guard, endpoints, requests,
                 request_durations, launcher_name, runtime_dir, metrics_url, stopping,
                 waiting_handshakes):
        self.loop = loop
        self.manager = manager
        self.scheduler = scheduler
        self.usage = usage
        self.guard = guard
        self.endpoints = endpoints
        self.requests = requests
        self.request_durations = request_durations
        self.launcher_name = launcher_name
        self.runtime_dir = runtime_dir
        self.metrics_url = metrics_url
        self.stopping = stopping
        self.waiting_handshakes = waiting_handshakes   # the front's {model: count}, live
        self.load_durations = metrics.Histogram(metrics.LOAD_BUCKETS)
        self.evictions = {}               # model name -> times evicted
        self.hostname = socket.gethostname()
        self.pid = os.getpid()
        self.started_at = loop.wall_clock()
        self.started_mono = loop.clock()
        self._started_at_text = iso_time(self.started_at)
        self._models_cache = None         # (key, counts, [(entry text, uptime start)])
        self._template = None             # (key, (the text with slots, uptime starts))

    # -- what it is told --------------------------------------------------------------
    def on_transition(self, backend, old_state, new_state):
        """A registry listener: how long each load took to get ready."""
        if new_state == states.READY and old_state == states.LOADING and \
                backend.ready_at is not None and backend.started_at is not None:
            self.load_durations.observe(backend.name, backend.ready_at - backend.started_at)

    def on_scheduler_event(self, backend, state):
        if state == "evicted":
            self.evictions[backend.name] = self.evictions.get(backend.name, 0) + 1

    # -- what it tells ------------------------------------------------------------------
    def status_line(self):
        prefix = "stopping; " if self.stopping() else ""
        return prefix + self.manager.registry.summary()

    def metrics_text(self):
        return metrics.render(self.status_data(), self.request_durations,
                              [s for s in sorted(states.VISIBLE)], self.load_durations,
                              self.evictions)

    def _measure_gpus(self):
        """Real free memory from nvidia-smi where there is one: usage.py's last reading,
        refreshed in the background so status never waits for it."""
        if not self.manager.config.gpus:
            return None
        return self.usage.devices

    def model_status(self, backend, now_wall=None, now_mono=None):
        entry = backend.as_status(now_wall, now_mono)
        entry["unload_at"] = iso_time(self.scheduler.unload_at(backend))
        entry["keep_alive"] = self.scheduler.keep_alive(backend)
        entry["pinned"] = backend.spec.pinned
        entry["usage"] = self.usage.entry(backend.name, backend.pid)   # the cached reading
        return entry

    def status_json(self):
        """status.data as JSON text: what status_data() encodes to, with each model's uptime
        last. It is the request operators and monitoring send most, so the text is kept
        between requests with slots for figures: the models' part is rebuilt when a backend changed
        (registry.backend_changes) or the usage reading did, the rest when anything it shows
        did (``_head_key``), and only the figures that move per request (uptimes, request and
        connection counts) are filled in each time."""
        now_mono = self.loop.clock()
        self.usage.current()             # a refresh in the background when it is stale
        models_key = (backend_changes(), self.usage.refreshes)
        if self._models_cache is None or self._models_cache[0] != models_key:
            self._models_cache = (models_key, *self._encode_models())
        head_key = self._head_key(models_key)
        if self._template is None or self._template[0] != head_key:
            self._template = (head_key, self._encode_template())
        _, (layout, starts) = self._template
        guard = self.guard
        figures = [seconds_text(now_mono - self.started_mono),
                   *[f"{count}" for count in self.requests.values()],
                   f"{guard.connections}", f"{guard.resets}",
                   *[seconds_text(now_mono - started) for started in starts]]
        text = layout.copy()
        text[1::2] = figures
        return "".join(text)

    def _encode_models(self):
        """The counts by state, and each shown model's entry but its uptime as JSON text with
        the time its uptime counts from (None: 0.0). An entry is encoded once per change of
        its backend (Backend.version) or of the usage reading."""
        reading = self.usage.refreshes
        counts, entries = {}, []
        for backend in self.manager.registry.backends.values():
            state = backend.state
            counts[state] = counts.get(state, 0) + 1
            if state not in states.VISIBLE:
                continue
            cached = backend.status_json
            key = (backend.version, reading)
            if cached is None or cached[0] != key:
                entry = self.model_status(backend)
                del entry["uptime"]
                cached = (key, to_json(entry)[:-1])
                backend.status_json = cached
            # Backend.uptime: counted while active, from started_mono.
            started = backend.started_mono if backend.phase in states.ACTIVE else None
            entries.append((cached[1], started))
        return counts, entries

    def _head_key(self, models_key):
        """All the head shows but what changes per request, cheap to gather and compare; the
        backends' part (their counts, the GPUs they hold) comes with ``models_key``."""
        scheduler = self.scheduler
        return (models_key, self.manager.config, self.stopping(), self.metrics_url(),
                tuple(self.requests), self.guard.budget,
                tuple(scheduler.queued_names()),
                tuple(scheduler.assignments.items()), tuple(self.waiting_handshakes.items()),
                tuple(self.manager.stats.items()))

    def _encode_template(self):
        """The whole text as a list: the fixed pieces, and between each two a slot for a figure
        status_json fills in, in the order it gives them: the service's uptime, the request
        counters, the open connections and the resets, then each active model's uptime; and
        the times those uptimes count from. (A list joined, not %-formatting: that walks all
        the text, char by char, per request.)"""
        _, counts, entries = self._models_cache
        head = self._head(counts, self.started_mono)
        head["uptime"] = _FIGURE
        head["requests"] = dict.fromkeys(self.requests, _FIGURE)
        head["connections"] = {"open": _FIGURE, "budget": self.guard.budget, "resets": _FIGURE}
        pieces = to_json(head)[:-1].split(to_json(_FIGURE))
        pieces[-1] += ',"models":['
        starts = []
        for number, (entry, started) in enumerate(entries):
            comma = "," if number else ""
            if started is None:
                pieces[-1] += f'{comma}{entry},"uptime":0.0}}'
            else:
                pieces[-1] += f'{comma}{entry},"uptime":'
                pieces.append("}")
                starts.append(started)
        pieces[-1] += "]}"
        layout = [None] * (2 * len(pieces) - 1)
        layout[0::2] = pieces
        return layout, starts

    def status_data(self):
        """status.data: the service, then every model not unloaded."""
        registry = self.manager.registry
        now_wall, now_mono = self.loop.wall_clock(), self.loop.clock()
        data = self._head(registry.count_by_state(), now_mono)
        data["models"] = [self.model_status(backend, now_wall, now_mono)
                          for backend in registry.backends.values()
                          if backend.state in states.VISIBLE]
        return data

    def _head(self, counts, now_mono):
        """status.data but its models; ``counts``: backends by state, in registry order."""
        config = self.manager.config
        self.usage.current()             # a refresh in the background when it is stale
        return {
            "service_status": "stopping" if self.stopping() else "running",
            "client_endpoint": self.endpoints["client"],
            "cli_endpoint": self.endpoints["cli"],
            "events_endpoint": self.endpoints["events"],
            "max_loaded_models": config.max_loaded_models,
            "queued": self.scheduler.queued_names(),
            "waiting_handshakes": dict(self.waiting_handshakes),
            "gpus": placement.device_status(config.gpus, self.scheduler.assignments,
                                            self._measure_gpus()),
            "version": __version__,
            "pid": self.pid,
            "hostname": self.hostname,
            "started_at": self._started_at_text,
            "uptime": round(now_mono - self.started_mono, 3),
            "launcher": self.launcher_name,
            "config_path": config.path,
            "runtime_dir": self.runtime_dir,
            "default_model": config.default_model,
            "summary": self.manager.registry.summary(counts),
            "counts": counts,
            "requests": dict(self.requests),
            "connections": {"open": self.guard.connections, "budget": self.guard.budget,
                            "resets": self.guard.resets},
            "loads": dict(self.manager.stats),
            "metrics_url": self.metrics_url(),
        }
