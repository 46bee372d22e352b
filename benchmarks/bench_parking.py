#!/usr/bin/python3
"""Parking vs unloading (issue 13): a request trace replayed through the real scheduler and
manager, in-process, on the fake clock of tests/fakes.py.

    .venv/bin/python -m benchmarks.bench_parking [--requests N] [--seed S]

The host: 2 GPUs x 80 GiB and host_memory 512 GiB. 20 models of 2-76 GiB (one GPU each,
gpu_memory their size): a catalogue of typical open-weight models (TYPICAL; the target holds
there), and sizes spread evenly (--catalogue linear: more than GPUs and host memory hold
together, shown for information); a cold load takes 5-95 s, growing with the size (the fake probe
answers that long after the start), a park 1 s, a wake 1.5 s + size / (20 GiB/s), a stop
0.5 s. The trace: sessions (bursts of 1-12 requests to one model, 0.5-3 s apart) whose model
is drawn from a Zipf popularity (s = 1.1, --zipf) that drifts (two neighbouring ranks swap every
500 requests, --drift-every),
the sessions a Poisson stream (mean 15 s apart). Each request is a load through the
scheduler; nothing is pinned, keep_alive is forever, so models leave only for room.

The same trace runs twice: models without park: (every eviction unloads) and with park:
protocol. It prints the seconds spent making models ready (cold loads, plus wakes when
parking) for each, and their ratio against the target (<= 0.15), "ok" or "MISS"; then the
ratio on three other traces (--other-seeds), for how much it depends on the trace. Figures
only; exit 0. About two minutes for 100,000 requests.

--what-if replays the typical catalogue's traces again with two physical limits lifted, to
tell what the remaining load seconds come from (the daemon keeps both limits, see
WhatIfScheduler): a parked model wakes only on the GPUs it had, and its weights stay in host
memory until its wake has copied them back.
"""

import argparse
import collections
import random
import sys
import tempfile
import statistics
import time

import yaml
import zmq

from backend_mgmt.scheduler import Scheduler

from .common import DaemonProcess, Table, tests_module

fakes = tests_module("fakes")

GiB = 1024 ** 3
GPUS = [{"id": 0, "memory": "80GiB"}, {"id": 1, "memory": "80GiB"}]
HOST_MEMORY = "512GiB"
MODELS = 20
PARK_SECONDS = 1.0
STOP_SECONDS = 0.5
WAKE_BASE, WAKE_RATE = 1.5, 20 * GiB      # seconds, bytes per second
TARGET_RATIO = 0.15


# A catalogue of typical open-weight models as served on 80 GiB GPUs (weights in GiB: bf16 up
# to ~30B parameters, FP8 or 4-bit above), 2-76 GiB as in the issue; most are small, as most
# open-weight models are.
TYPICAL = {
    "llama-3.2-1b": 2.5, "qwen2.5-1.5b": 3.1, "qwen2.5-3b": 6.2, "llama-3.2-3b": 6.4,
    "phi-3.5-mini": 7.6, "mistral-7b": 14.5, "qwen2.5-7b": 15.2, "llama-3.1-8b": 16.1,
    "gemma-2-9b": 18.5, "mistral-nemo-12b": 24.5, "phi-4-14b": 29.3, "qwen2.5-14b": 29.6,
    "llama-3.1-70b-awq": 37.0, "mistral-small-24b": 47.1, "mixtral-8x7b-fp8": 47.0,
    "gemma-2-27b": 54.5, "qwen2.5-32b": 65.5, "llama-3.3-70b-fp8": 70.6,
    "deepseek-r1-distill-70b-fp8": 71.0, "qwen2.5-72b-fp8": 76.0,
}


def load_seconds(gib):
    """A cold load: 5 s for the smallest, 95 s for 76 GiB, in between with the size."""
    return 5 + 90 * (gib - 2) / 74


def model_sizes(rng, catalogue="typical"):
    """{name: (GiB, cold load seconds)}. ``typical``: TYPICAL (about 640 GiB in all, a little
    less than the GPUs and host_memory together); ``linear``: sizes spread evenly over
    2-76 GiB (about 790 GiB, more than fits: the harder case)."""
    if catalogue == "typical":
        return {name: (gib, load_seconds(gib)) for name, gib in TYPICAL.items()}
    sizes = {}
    for index in range(MODELS):
        gib = round(2 + 74 * index / (MODELS - 1) + rng.uniform(-1, 1), 1)
        gib = min(76.0, max(2.0, gib))
        sizes[f"m{index:02d}"] = (gib, load_seconds(gib))
    return sizes


def trace(rng, names, requests, drift_every=500, zipf=1.1):
    """[(time, model)]: sessions of a drifting Zipf popularity."""
    ranks = list(names)
    rng.shuffle(ranks)
    weights = [1 / (rank + 1) ** zipf for rank in range(len(ranks))]
    out, clock = [], 0.0
    while len(out) < requests:
        clock += rng.expovariate(1 / 15)
        model = rng.choices(ranks, weights)[0]
        moment = clock
        for _ in range(rng.randint(1, 12)):
            out.append((moment, model))
            moment += rng.uniform(0.5, 3)
            if len(out) % drift_every == 0:      # popularity drifts: neighbours swap
                a = rng.randrange(len(ranks) - 1)
                ranks[a], ranks[a + 1] = ranks[a + 1], ranks[a]
    out.sort()
    return out[:requests]


class Replay:
    """One run of the trace: a fakes.Core whose fake backends load, stop, park and wake on
    the fake clock in the times above."""

    def __init__(self, sizes, parking, runtime_dir, scheduler_class=Scheduler):
        self.sizes = sizes
        self.paid = 0.0                          # seconds of cold loads and wakes finished
        self.counts = collections.Counter()
        models = {name: {"resources": {"gpus": 1, "gpu_memory": f"{gib}GiB"},
                         "startup_timeout": 600, **({"park": "protocol"} if parking else {})}
                  for name, (gib, _) in sizes.items()}
        self.core = fakes.Core(models, runtime_dir, gpus=GPUS, host_memory=HOST_MEMORY,
                               max_queue=1_000_000, scheduler_class=scheduler_class)
        self.loop = self.core.loop
        manager = self.core.manager
        manager.probe_factory = self._probe
        self.core.parkers.seconds = self._step_seconds
        launcher = self.core.launcher
        start = launcher.start
        launcher.start = lambda launch, on_output, on_exit: self._stoppable(
            start(launch, on_output, on_exit))
        manager.registry.listeners.append(self._count)
        self.errors = 0

    def _probe(self, loop, context, endpoint, model, on_ready, on_error=None):
        probe = self.core.probes(loop, context, endpoint, model, on_ready, on_error)
        seconds = self.sizes[model][1]

        def answer():
            if not probe.cancelled:
                self.paid += seconds
                probe.answer()
        self.loop.call_later(seconds, answer)
        return probe

    def _step_seconds(self, backend, step):
        if step == "park":
            return PARK_SECONDS
        seconds = WAKE_BASE + self.sizes[backend.name][0] * GiB / WAKE_RATE
        self.paid += seconds                     # paid as the wake starts: it always ends
        return seconds

    def _stoppable(self, running):
        def stop(timeout):
            running.stops.append(timeout)
            self.loop.call_later(STOP_SECONDS, lambda: running.exited or running.exit())
        running.stop = stop
        return running

    def _count(self, backend, old, new):
        if new in ("loading", "waking", "parked") and old != "loading":
            self.counts[new] += 1
        if new == "unloaded":
            self.counts["unloaded"] += 1

    def run(self, requests):
        def answered(backend, error):
            if error is not None:
                self.errors += 1
        for moment, model in requests:
            self.loop.advance(moment - self.loop.now)
            self.core.scheduler.load(model, answered)
        self.loop.advance(3600)                  # let the last loads finish
        return self


class WhatIfScheduler(Scheduler):
    """The real scheduler with two physical limits lifted, for --what-if only: ``any_device``,
    a parked model may wake on any GPU with room (a CUDA process cannot move: the daemon
    wakes it where it was); ``no_swap_peak``, the weights of a model queued to wake no longer
    count against host_memory (they do until its wake has copied them back, so the park that
    makes its GPU room holds both at once)."""

    any_device = no_swap_peak = False

    def _wakes_on(self, backend):
        return None if self.any_device else super()._wakes_on(backend)

    def _host_held(self):
        if not self.no_swap_peak:
            return super()._host_held()
        waking = set(self.queued_names())
        return sum(held for name, held in self.parked_host.items() if name not in waking)


def what_if(any_device, no_swap_peak):
    return type("WhatIf", (WhatIfScheduler,), {"any_device": any_device,
                                               "no_swap_peak": no_swap_peak})


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument("--drift-every", type=int, default=500,
                        help="requests between two swaps of neighbouring popularity ranks")
    parser.add_argument("--zipf", type=float, default=1.1, help="the popularity's exponent")
    parser.add_argument("--catalogue", choices=("typical", "linear", "both"), default="both",
                        help="the models: TYPICAL, sizes spread evenly, or each in turn")
    parser.add_argument("--other-seeds", default="1,2,3",
                        help="seeds whose typical-catalogue ratio is shown too, for how much "
                             "it depends on the trace ('' for none)")
    parser.add_argument("--what-if", action="store_true",
                        help="the typical traces again with the two physical limits lifted, "
                             "each and both (about two minutes more)")
    parser.add_argument("--real-rounds", type=int, default=10,
                        help="rounds of cold start against wake through the real daemon "
                             "with a reference backend (0: skip)")
    args = parser.parse_args()
    began = time.monotonic()
    table = Table()
    typical = {}                  # seed -> (unload only, parking) on the typical catalogue
    for catalogue in ("typical", "linear") if args.catalogue == "both" else (args.catalogue,):
        sizes, requests = seeded(args.seed, catalogue, args)
        runs = compare(table, catalogue, sizes, requests, args,
                       target=catalogue == "typical")
        if catalogue == "typical":
            typical[args.seed] = runs
    other_seeds = [int(seed) for seed in args.other_seeds.split(",") if seed.strip()]
    if other_seeds:
        table.section(f"typical catalogue, other traces (seeds {args.other_seeds}): "
                      f"parking / unload only")
        for seed in other_seeds:
            typical[seed] = replay_both(*seeded(seed, "typical", args))
            table.row(f"seed {seed}", f"{ratio_between(*typical[seed]):.3f}", "(info)")
    if args.what_if:
        show_what_if(table, [args.seed, *other_seeds], args, typical)
    if args.real_rounds:
        real_wake_vs_cold(table, args.real_rounds)
    print(f"bench_parking, seed {args.seed}, {time.monotonic() - began:.0f} s")
    table.print()
    return 0


class ParkingDaemon(DaemonProcess):
    """The real daemon with one reference backend model whose type parks over the sleep
    protocol."""

    def _write_config(self):
        document = {
            "runtime_dir": self.run_dir,
            "model_backends": {"reference": {
                "command": ["{python}", "-m", "backend_mgmt.reference_backend"],
                "startup_timeout": 30, "stop_timeout": 5, "park": "protocol"}},
            "supported_models": [{"name": "m", "type": "reference"}],
        }
        with open(self.config_path, "w") as stream:
            yaml.safe_dump(document, stream)


def real_wake_vs_cold(table, rounds):
    """load-model's answer time through the real daemon: a cold start (after unload-model)
    against a wake (after park-model), alternately. The reference backend holds no weights,
    so this is what the daemon and a backend process add: a real engine adds its own load
    (minutes) to the cold start and its own wake (seconds) to the wake."""
    context = zmq.Context()
    times = {"cold": [], "wake": []}
    with tempfile.TemporaryDirectory(prefix="bench-parking-real") as tmp:
        daemon = ParkingDaemon(tmp)
        try:
            daemon.start(context)
            for _ in range(rounds):
                for kind, before in (("cold", "unload-model"), ("wake", "park-model")):
                    if daemon.control.call("status")[0]["data"]["models"]:
                        reply = daemon.control.call(before, "m", timeout=30)[0]
                        if not reply["success"]:
                            raise RuntimeError(f"{before}: {reply}")
                    reply, sent, received = daemon.control.call("load-model", "m", timeout=30)
                    if not reply["success"]:
                        raise RuntimeError(f"load-model: {reply}")
                    times[kind].append(received - sent)
        finally:
            daemon.stop()
            context.destroy(linger=0)
    table.section(f"real daemon, reference backend (no weights): load-model answer time, "
                  f"{rounds} alternated rounds")
    cold, wake = (statistics.median(times[k]) for k in ("cold", "wake"))
    table.row("cold start (after unload-model): median", f"{cold * 1000:.0f} ms", "(info)")
    table.row("wake (after park-model): median", f"{wake * 1000:.1f} ms", "(info)")
    table.row("wake / cold start", f"{wake / cold:.3f}", "(info)")


def show_what_if(table, seeds, args, replayed):
    """``replayed``: {seed: (unload only, parking)} of the typical catalogue, where run
    already (the --catalogue linear run has none)."""
    table.section("typical catalogue, parking / unload only with physical limits lifted "
                  "(what the rest comes from; the daemon keeps both limits)")
    for seed in seeds:
        sizes, requests = seeded(seed, "typical", args)
        unload_only, parked = replayed.get(seed) or replay_both(sizes, requests)
        figures = [f"{ratio_between(unload_only, parked):.3f}"]
        for limits in ((True, False), (False, True), (True, True)):
            with tempfile.TemporaryDirectory(prefix="bench-parking") as runtime_dir:
                lifted = Replay(sizes, True, runtime_dir, what_if(*limits)).run(requests)
            figures.append(f"{ratio_between(unload_only, lifted):.3f}")
        table.row(f"seed {seed}: as is, any GPU, no swap peak, both", " / ".join(figures),
                  "(info)")


def replay_both(sizes, requests):
    """(unload only, parking): the trace replayed without park: and with it."""
    runs = []
    for parking in (False, True):
        with tempfile.TemporaryDirectory(prefix="bench-parking") as runtime_dir:
            runs.append(Replay(sizes, parking, runtime_dir).run(requests))
    return runs


def ratio_between(unload_only, parked):
    return parked.paid / unload_only.paid if unload_only.paid else float("nan")


def seeded(seed, catalogue, args):
    """(sizes, requests): the catalogue and the trace that ``seed`` draws."""
    rng = random.Random(seed)
    sizes = model_sizes(rng, catalogue)
    return sizes, trace(rng, sorted(sizes), args.requests, args.drift_every, args.zipf)


def compare(table, catalogue, sizes, requests, args, target):
    """The trace with and without park: on one catalogue, as rows of ``table``; the ratio is
    held to the target for the typical catalogue (the issue's), shown for the other. Returns
    the two runs (unload only, parking)."""
    unload_only, parked = replay_both(sizes, requests)
    ratio = ratio_between(unload_only, parked)
    total = sum(g for g, _ in sizes.values())
    table.section(f"{catalogue} catalogue: {len(sizes)} models of "
                  f"{min(g for g, _ in sizes.values()):g}-{max(g for g, _ in sizes.values()):g}"
                  f" GiB, {total:.0f} GiB in all (GPUs 160 + host_memory 512); "
                  f"{len(requests):,} requests over {requests[-1][0] / 3600:.1f} h (fake "
                  f"clock), seed {args.seed}, Zipf {args.zipf:g}, drift every "
                  f"{args.drift_every}")
    for label, run in (("unload only", unload_only), ("parking", parked)):
        table.row(f"{label}: load seconds", f"{run.paid:,.0f} s", "(info)")
        table.note(f"{run.counts['loading']:,} cold loads, {run.counts['waking']:,} wakes, "
                   f"{run.counts['parked']:,} parks, {run.counts['unloaded']:,} unloads, "
                   f"{run.errors} failed requests")
    if target:
        table.row("parking / unload only", f"{ratio:.3f}", f"<= {TARGET_RATIO}",
                  ratio <= TARGET_RATIO)
    else:
        table.row("parking / unload only", f"{ratio:.3f}", "(info)")
    return unload_only, parked


if __name__ == "__main__":
    sys.exit(main())
