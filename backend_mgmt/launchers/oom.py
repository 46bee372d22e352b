"""Was a SIGKILLed child killed by the out-of-memory killer? Ask its memory cgroup.

The kernel counts OOM kills per memory cgroup: ``oom_kill`` in memory.events (cgroup v2)
or memory.oom_control (v1). A child backend that dies of SIGKILL while that count went up
since it started is reported as an OOM kill. (Backends in systemd units learn this from
systemd itself: SERVICE_RESULT=oom-kill.)
"""

import os

CGROUP_ROOT = "/sys/fs/cgroup"


def counter_file(pid):
    """The file holding the oom_kill count of ``pid``'s memory cgroup, or None."""
    try:
        with open(f"/proc/{pid}/cgroup") as stream:
            lines = stream.read().splitlines()
    except OSError:
        return None
    for line in lines:                       # v1 (or hybrid): "4:memory:/path"
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            return os.path.join(CGROUP_ROOT, "memory", path.lstrip("/"), "memory.oom_control")
    for line in lines:                       # v2: "0::/path"
        if line.startswith("0::"):
            return os.path.join(CGROUP_ROOT, line[3:].lstrip("/"), "memory.events")
    return None


def oom_kills(path):
    """The oom_kill count in ``path`` (from counter_file), or None if unreadable."""
    if path is None:
        return None
    try:
        with open(path) as stream:
            for line in stream:
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
    except (OSError, ValueError):
        pass
    return None
