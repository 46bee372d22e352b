"""Per-model resource usage, measured off the event loop and kept in a cache.

``UsageMonitor.current()`` is what status reads: the last reading, never a measurement. When
that reading is older than ``USAGE_EVERY`` seconds, asking for it starts a refresh in the
background (at most one at a time), so an idle daemon measures nothing and a busy one at most
every few seconds. A refresh gathers, in parallel:

- for transient units, one ``systemctl show -p MemoryCurrent -p CPUUsageNSec UNIT...`` for all
  of them (the unit's control group as systemd accounts it; works on cgroup v1 and v2; where
  systemd has no figure, e.g. in a container without a delegated memory controller, the
  process tree's figures are shown instead, and ``source`` says which);
- for every backend's main process, its whole process tree (resident memory and CPU time
  summed; for child-process backends these are the figures shown), from one pass over
  /proc/PID/stat in a worker thread: a few milliseconds for hundreds of processes, with the
  GIL released in every read;
- where ``nvidia-smi`` exists, its two queries (nvidia_smi.py): the devices (also shown in
  ``status.gpus``) and the compute processes; a process's GPU memory is counted for the
  backend whose process tree holds it.

The commands run through ``run_async``, the thread hands its result back with
``call_soon_threadsafe``; the parts are combined on the loop by ``combine`` (pure).
"""

import logging
import os
import queue
import threading
import time

from . import nvidia_smi
from .loop import run_async
from .registry import iso_time

log = logging.getLogger(__name__)

USAGE_EVERY = 5.0            # seconds a reading is fresh enough
COMMAND_TIMEOUT = 5.0        # systemctl show / nvidia-smi, each


# -- parsing and combining (pure) --------------------------------------------------------

def parse_systemctl_show(text):
    """{unit: {"memory_bytes": int|None, "cpu_seconds": float|None}} from
    ``systemctl show -p Id -p MemoryCurrent -p CPUUsageNSec U1 U2 ...`` (blocks separated by
    blank lines). systemd prints ``[not set]`` or 2^64-1 for a figure it does not account."""
    units = {}
    for block in text.split("\n\n"):
        fields = dict(line.split("=", 1) for line in block.splitlines() if "=" in line)
        unit = fields.get("Id")
        if not unit:
            continue
        units[unit] = {"memory_bytes": _counter(fields.get("MemoryCurrent")),
                       "cpu_seconds": _seconds(_counter(fields.get("CPUUsageNSec")))}
    return units


def _counter(value):
    if value is None or not value.isdigit() or int(value) >= 2 ** 64 - 1:
        return None
    return int(value)


def _seconds(nanoseconds):
    return None if nanoseconds is None else round(nanoseconds / 1e9, 3)


def combine(targets, trees, units, devices, apps, measured_at):
    """Each target's usage entry, {name: entry}.

    ``targets``: {name: (pid, unit)}; ``trees``: {name: {"pids", "memory_bytes",
    "cpu_seconds"}} from the process trees; ``units``: parse_systemctl_show's result;
    ``devices``: nvidia_smi.parse_devices's result or None (no nvidia-smi); ``apps``:
    nvidia_smi.parse_processes's result or None."""
    index_of_bus = {d.get("bus_id", "").lower(): index for index, d in (devices or {}).items()}
    usage = {}
    for name, (pid, unit) in targets.items():
        tree = trees.get(name) or {}
        figures, source = tree, "processes"
        cgroup = units.get(unit) or {} if unit is not None else {}
        if cgroup.get("memory_bytes") is not None:
            # systemd accounts the unit's control group. Where it cannot (no memory
            # controller delegated to it, as in some containers) the process tree stands in.
            figures, source = {**tree, **{k: v for k, v in cgroup.items() if v is not None}}, \
                "cgroup"
        gpu = None
        if apps is not None:
            gpu = {}
            pids = tree.get("pids") or ()
            for app_pid, used, bus_id in apps:
                if app_pid in pids and used is not None:
                    key = str(index_of_bus.get(bus_id, bus_id))
                    gpu[key] = gpu.get(key, 0) + used
        usage[name] = {"pid": pid, "memory_bytes": figures.get("memory_bytes"),
                       "cpu_seconds": figures.get("cpu_seconds"), "gpu_memory_bytes": gpu,
                       "source": source, "measured_at": measured_at}
    return usage


# -- process trees (IO: /proc; run in the worker thread) ----------------------------------

def read_processes(proc="/proc"):
    """{pid: (ppid, resident bytes, CPU seconds)} of every process, from one read of each
    /proc/PID/stat: the same counters psutil reports (rss; utime+stime, plus cutime+cstime,
    the CPU time of children it has reaped). Reading them directly costs a few milliseconds
    for hundreds of processes; psutil costs several times that."""
    page, tick = os.sysconf("SC_PAGE_SIZE"), os.sysconf("SC_CLK_TCK")
    processes = {}
    for entry in os.listdir(proc):
        if not entry.isdigit():
            continue
        try:
            with open(f"{proc}/{entry}/stat", "rb") as stream:
                fields = stream.read().rsplit(b")", 1)[1].split()
            processes[int(entry)] = (int(fields[1]), int(fields[21]) * page,
                                     sum(int(f) for f in fields[11:15]) / tick)
        except (OSError, IndexError, ValueError):
            continue            # ended while we looked
    return processes


def process_trees(roots, processes):
    """{root: {"pids", "memory_bytes", "cpu_seconds"} or None when it is gone} for each root
    pid and all its descendants (pure; ``processes`` from read_processes). Memory is the sum
    of resident set sizes (shared pages count once per process)."""
    children = {}
    for pid, (ppid, _, _) in processes.items():
        children.setdefault(ppid, []).append(pid)
    trees = {}
    for root in roots:
        if root not in processes:
            trees[root] = None
            continue
        pids, todo = set(), [root]
        while todo:
            pid = todo.pop()
            if pid not in pids:
                pids.add(pid)
                todo.extend(children.get(pid, ()))
        trees[root] = {"pids": pids,
                       "memory_bytes": sum(processes[pid][1] for pid in pids),
                       "cpu_seconds": round(sum(processes[pid][2] for pid in pids), 3)}
    return trees


# -- the monitor (on the loop) ------------------------------------------------------------

class UsageMonitor:
    """The cache of usage per model and the background refresh that fills it."""

    def __init__(self, loop, backends, nvidia_smi=None, every=USAGE_EVERY):
        self.loop = loop
        self._backends = backends          # callable: {name: (pid, unit)} of live backends
        self.nvidia_smi = nvidia_smi       # path, or None where there is none
        self.every = every
        self.usage = {}                    # name -> entry (see combine)
        self.public = {}                   # name -> the entry as status shows it
        self.devices = None                # the last nvidia_smi.parse_devices result
        self.refreshes = 0
        self._measured_mono = -1e9
        self._pending = None               # parts still outstanding in a refresh
        self._jobs = None                  # the worker thread's queue, once started
        self._closed = False

    def current(self):
        """The last reading, {name: entry}; starts a refresh when it is stale. Never waits."""
        if self._pending is None and self.loop.clock() - self._measured_mono > self.every:
            self.refresh()
        return self.usage

    def entry(self, name, pid):
        """The cached entry of a backend as status shows it, or None (none yet, or a
        reading of an earlier process of that model). ``refreshes`` counts readings, so a
        caller may cache what it built from an entry until the next one."""
        entry = self.usage.get(name)
        return self.public[name] if entry is not None and entry["pid"] == pid else None

    def refresh(self):
        """Measure now, unless a refresh is under way."""
        if self._pending is not None:
            return
        targets = self._backends()
        parts = {"targets": targets, "trees": {}, "units": {}, "devices": None, "apps": None}
        self._pending = set()
        units = sorted(unit for _, unit in targets.values() if unit)
        if units:
            self._pending.add("units")
            run_async(self.loop, ["systemctl", "show", "-p", "Id", "-p", "MemoryCurrent",
                                  "-p", "CPUUsageNSec", *units],
                      lambda result: self._part(parts, "units", parse_systemctl_show(
                          result.stdout) if result.ok else {}), timeout=COMMAND_TIMEOUT)
        if self.nvidia_smi is not None:
            self._pending.update(("devices", "apps"))
            run_async(self.loop, nvidia_smi.devices_command(self.nvidia_smi),
                      lambda result: self._part(parts, "devices", nvidia_smi.parse_devices(
                          result.stdout) if result.ok else None), timeout=COMMAND_TIMEOUT)
            run_async(self.loop, nvidia_smi.processes_command(self.nvidia_smi),
                      lambda result: self._part(parts, "apps", nvidia_smi.parse_processes(
                          result.stdout) if result.ok else None), timeout=COMMAND_TIMEOUT)
        pids = {name: pid for name, (pid, _) in targets.items() if pid}
        if pids:
            self._pending.add("trees")
            self._submit(lambda: process_trees(set(pids.values()), read_processes()),
                         lambda trees: self._part(parts, "trees", {
                             name: trees[pid] for name, pid in pids.items() if trees.get(pid)}))
        if not self._pending:
            self.loop.call_later(0, lambda: self._part(parts, "nothing", None))

    def _part(self, parts, key, value):
        parts[key] = value
        self._pending.discard(key)
        if self._pending:
            return
        self._pending = None
        self._measured_mono = self.loop.clock()
        self.refreshes += 1
        self.devices = parts["devices"]
        self.usage = combine(parts["targets"], parts["trees"], parts["units"], parts["devices"],
                             parts["apps"], time.time())
        self.public = {name: _public(entry) for name, entry in self.usage.items()}

    # -- the worker thread ----------------------------------------------------------------
    def _submit(self, work, on_result):
        """Run ``work()`` in the worker thread; ``on_result(result)`` on the loop. /proc is
        read with the GIL released in each read, so the loop is not held up meanwhile."""
        if self._jobs is None:
            self._jobs = queue.SimpleQueue()
            threading.Thread(target=self._work_forever, name="usage", daemon=True).start()
        self._jobs.put((work, on_result))

    def _work_forever(self):
        while True:
            work, on_result = self._jobs.get()
            if work is None:
                return
            try:
                result = work()
            except Exception:            # a bug here must not leave the refresh pending
                log.exception("measuring usage failed")
                result = {}
            if not self._closed:         # the loop's wake-up pipe is gone once closed
                # Bound now: by the time the loop runs it, the next job has its own.
                self.loop.call_soon_threadsafe(lambda r=result, done=on_result: done(r))

    def close(self):
        self._closed = True
        if self._jobs is not None:
            self._jobs.put((None, None))


def _public(entry):
    """The entry as status shows it (the pid is only there to match readings)."""
    return {"memory_bytes": entry["memory_bytes"], "cpu_seconds": entry["cpu_seconds"],
            "gpu_memory_bytes": entry["gpu_memory_bytes"], "source": entry["source"],
            "measured_at": iso_time(entry["measured_at"])}
