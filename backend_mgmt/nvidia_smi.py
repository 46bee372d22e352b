"""nvidia-smi: the two queries the daemon makes and what their answers mean (pure).

The daemon runs them off its loop (usage.py, through ``run_async``) with the executable it
found on its PATH; this module only builds the command lines and reads the CSV they print.
Sizes are in MiB there, in bytes here.
"""

MIB = 1024 * 1024
_CSV = "--format=csv,noheader,nounits"


def devices_command(executable):
    """Free and total memory and the PCI bus id of every device."""
    return [executable, "--query-gpu=index,memory.free,memory.total,pci.bus_id", _CSV]


def processes_command(executable):
    """The memory each compute process uses, and on which device (by bus id)."""
    return [executable, "--query-compute-apps=pid,used_memory,gpu_bus_id", _CSV]


def parse_devices(text):
    """{index: {"free": bytes, "total": bytes, "bus_id": str}} from devices_command's output
    (the PCI bus id, which the per-process query names devices by, when present). A value the
    driver does not report ("[N/A]", e.g. under MIG) is None; unreadable lines are skipped."""
    devices = {}
    for line in text.splitlines():
        fields = [field.strip() for field in line.split(",")]
        if len(fields) not in (3, 4) or not fields[0].isdigit():
            continue
        free, total = (int(field) * MIB if field.isdigit() else None for field in fields[1:3])
        devices[int(fields[0])] = {"free": free, "total": total}
        if len(fields) == 4:
            devices[int(fields[0])]["bus_id"] = fields[3]
    return devices


def parse_processes(text):
    """[(pid, bytes or None, bus id in lower case)] from processes_command's output."""
    apps = []
    for line in text.splitlines():
        fields = [field.strip() for field in line.split(",")]
        if len(fields) != 3 or not fields[0].isdigit():
            continue
        used = int(fields[1]) * MIB if fields[1].isdigit() else None
        apps.append((int(fields[0]), used, fields[2].lower()))
    return apps
