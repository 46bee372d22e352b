"""Per-model usage (usage.py): the parsers and the combination, then the real daemon measuring
a real reference backend that holds a known amount of memory, checked against /proc.

This machine has no GPU and no nvidia-smi: the GPU part runs against a stand-in executable
on PATH that prints what a real nvidia-smi prints for these queries (captured format)."""

import os
import stat
import subprocess
import sys
import textwrap

from backend_mgmt import nvidia_smi, usage
from harness import wait_until

MIB = 1024 * 1024


# -- pure parts ----------------------------------------------------------------------------

SHOW = """\
Id=backend-mgmt-demo-1a2b.service
MemoryCurrent=71303168
CPUUsageNSec=1234567890

Id=backend-mgmt-other-3c4d.service
MemoryCurrent=[not set]
CPUUsageNSec=18446744073709551615
"""


def test_systemctl_show_for_many_units_is_parsed_per_unit():
    assert usage.parse_systemctl_show(SHOW) == {
        "backend-mgmt-demo-1a2b.service": {"memory_bytes": 71303168, "cpu_seconds": 1.235},
        "backend-mgmt-other-3c4d.service": {"memory_bytes": None, "cpu_seconds": None}}
    assert usage.parse_systemctl_show("") == {}


def test_compute_apps_are_parsed_and_attributed_to_the_tree_that_holds_them():
    apps = nvidia_smi.parse_processes("4242, 1000, 00000000:3B:00.0\n"
                                      "4243, 24, 00000000:3B:00.0\n"
                                      "4244, [N/A], 00000000:86:00.0\n"
                                      "9999, 500, 00000000:86:00.0\n"
                                      "No running processes found\n")
    assert apps[0] == (4242, 1000 * MIB, "00000000:3b:00.0")
    devices = {0: {"free": 1, "total": 2, "bus_id": "00000000:3B:00.0"},
               1: {"free": 1, "total": 2, "bus_id": "00000000:86:00.0"}}
    targets = {"child": (4242, None), "unit": (5000, "backend-mgmt-u.service"),
               "gone": (7000, None)}
    trees = {"child": {"pids": {4242, 4243, 4244}, "memory_bytes": 10, "cpu_seconds": 1.5},
             "unit": {"pids": {5000, 9999}, "memory_bytes": 3, "cpu_seconds": 0.1}}
    units = {"backend-mgmt-u.service": {"memory_bytes": 99, "cpu_seconds": 2.0}}
    result = usage.combine(targets, trees, units, devices, apps, 1.0)
    assert result["child"]["gpu_memory_bytes"] == {"0": 1024 * MIB}
    assert (result["child"]["memory_bytes"], result["child"]["source"]) == (10, "processes")
    # A unit's memory and CPU are its control group's, not the process tree's.
    assert (result["unit"]["memory_bytes"], result["unit"]["cpu_seconds"]) == (99, 2.0)
    assert result["unit"]["gpu_memory_bytes"] == {"1": 500 * MIB}
    assert result["gone"]["memory_bytes"] is None
    # A unit whose control group systemd does not account: its process tree stands in.
    unaccounted = {"backend-mgmt-u.service": {"memory_bytes": None, "cpu_seconds": None}}
    result = usage.combine(targets, trees, unaccounted, devices, apps, 1.0)
    assert (result["unit"]["memory_bytes"], result["unit"]["source"]) == (3, "processes")
    # Without nvidia-smi GPU memory is unknown (None), not zero.
    assert usage.combine(targets, trees, units, None, None, 1.0)["child"][
        "gpu_memory_bytes"] is None


def test_a_tree_is_the_root_and_all_its_descendants():
    processes = {1: (0, 10, 1.0), 100: (1, 1000, 2.0), 101: (100, 200, 0.5),
                 102: (101, 30, 0.25), 200: (1, 7, 9.0)}
    trees = usage.process_trees({100, 200, 300}, processes)
    assert trees[100] == {"pids": {100, 101, 102}, "memory_bytes": 1230, "cpu_seconds": 2.75}
    assert trees[200]["memory_bytes"] == 7
    assert trees[300] is None                     # gone


def test_proc_is_read_as_the_kernel_reports_it():
    own = usage.read_processes()[os.getpid()]
    assert own[0] == os.getppid()
    with open("/proc/self/status") as stream:
        rss = next(int(line.split()[1]) * 1024 for line in stream if line.startswith("VmRSS"))
    assert abs(own[1] - rss) <= 0.1 * rss
    assert 0 < own[2] <= sum(os.times()[:4]) + 0.05


# -- the real daemon -----------------------------------------------------------------------

def tree_rss_from_proc(pid):
    """Resident memory of ``pid`` and its descendants, as the kernel reports it."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stream:
                    ppid = int(stream.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        todo.extend(children.get(current, []))
        with open(f"/proc/{current}/status") as stream:
            for line in stream:
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
    return total


def measured(daemon, name, after=None):
    def reading():
        model = daemon.model(name)
        entry = model and model.get("usage")
        if entry and (after is None or entry["measured_at"] > after):
            return entry
        return None
    return wait_until(reading, 20, 0.1, f"a usage reading for {name}")


def test_each_measurement_reaches_its_own_callback_however_late_the_loop_runs():
    """The worker thread hands each result to the loop; two finished before the loop came
    round must still go one to each callback (a callback bound late took the last job's
    result and callback twice). In-process, with the real loop and worker thread."""
    from backend_mgmt.loop import EventLoop
    loop = EventLoop()
    monitor = usage.UsageMonitor(loop, lambda: {})
    got = []

    def took(which):
        def on_result(result):
            got.append((which, result))
            if len(got) == 2:
                loop.stop()
        return on_result
    try:
        monitor._submit(lambda: "first", took("one"))
        monitor._submit(lambda: "second", took("two"))
        # Both handed over before the loop runs any (the loop is not running yet).
        wait_until(lambda: len(loop._mailbox.calls) == 2, 5,
                   message="both results handed to the loop")
        loop.call_later(5, loop.stop)                   # bounded, should a result be lost
        loop.run()
        assert got == [("one", "first"), ("two", "second")]
    finally:
        monitor.close()
        loop.close()


def test_status_shows_the_memory_and_cpu_of_a_child_backends_process_tree(daemon_factory):
    daemon = daemon_factory({"demo": ["--hold-memory", "64"]})
    assert daemon.load("demo")["success"]
    pid = daemon.model("demo")["pid"]
    entry = measured(daemon, "demo")
    kernel = tree_rss_from_proc(pid)
    assert entry["source"] == "processes"
    assert entry["memory_bytes"] >= 64 * MIB
    # Both readings are of the same idle process a moment apart: within 5 %.
    assert abs(entry["memory_bytes"] - kernel) <= 0.05 * kernel, (entry, kernel)
    with open(f"/proc/{pid}/stat") as stream:
        fields = stream.read().rsplit(")", 1)[1].split()
    cpu_now = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    assert 0 < entry["cpu_seconds"] <= cpu_now + 0.05
    assert entry["gpu_memory_bytes"] is None          # no nvidia-smi on this machine
    # The CLI's table shows it.
    output = subprocess.run([sys.executable, "-m", "backend_mgmt", "status", "--config",
                             daemon.config_path], capture_output=True, text=True, timeout=30,
                            check=True).stdout
    header = next(line for line in output.splitlines() if line.startswith("NAME"))
    assert "MEMORY" in header and "CPU" in header and "MiB" in output


def stand_in_nvidia_smi(directory, pid_file):
    """An executable named nvidia-smi answering the two queries the daemon makes, the way
    the real one prints them, with the pid the test writes to ``pid_file``."""
    bindir = os.path.join(directory, "bin")
    os.makedirs(bindir, exist_ok=True)
    path = os.path.join(bindir, "nvidia-smi")
    with open(path, "w") as stream:
        stream.write(textwrap.dedent(f"""\
            #!/bin/sh
            case "$1" in
            --query-gpu=*) echo "0, 80000, 81559, 00000000:3B:00.0" ;;
            --query-compute-apps=*)
                [ -s {pid_file} ] && echo "$(cat {pid_file}), 1500, 00000000:3B:00.0" ;;
            *) exit 2 ;;
            esac
            """))
    os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR)
    return bindir


def test_gpu_memory_of_a_backends_processes_comes_from_nvidia_smi(daemon_factory, workdir):
    pid_file = os.path.join(workdir, "gpu-pid")
    bindir = stand_in_nvidia_smi(workdir, pid_file)
    daemon = daemon_factory({"demo": []}, env={"PATH": bindir + ":" + os.environ["PATH"]},
                            gpus=[{"id": 0, "memory": "80GiB"}])
    assert daemon.load("demo")["success"]
    first = measured(daemon, "demo")
    with open(pid_file, "w") as stream:
        stream.write(str(daemon.model("demo")["pid"]))
    entry = measured(daemon, "demo", after=first["measured_at"])
    assert entry["gpu_memory_bytes"] == {"0": 1500 * MIB}
    # The same reading gives status.gpus the driver's free memory (one nvidia-smi caller).
    gpus = daemon.request("status")["data"]["gpus"]
    assert gpus[0]["measured_free"] == 80000 * MIB
