"""nvidia-smi's two queries and their output, from captures of a real nvidia-smi (this
machine has none; tests/test_usage.py runs the daemon against a stand-in executable)."""

from backend_mgmt import nvidia_smi

MiB = 1024 ** 2

DEVICES = """\
0, 80589, 81559, 00000000:3B:00.0
1, 1234, 81559, 00000000:86:00.0
2, [N/A], [N/A], 00000000:AF:00.0
No devices were found
"""


def test_the_commands_ask_for_csv_without_header_or_units():
    assert nvidia_smi.devices_command("/usr/bin/nvidia-smi") == [
        "/usr/bin/nvidia-smi", "--query-gpu=index,memory.free,memory.total,pci.bus_id",
        "--format=csv,noheader,nounits"]
    assert nvidia_smi.processes_command("nvidia-smi") == [
        "nvidia-smi", "--query-compute-apps=pid,used_memory,gpu_bus_id",
        "--format=csv,noheader,nounits"]


def test_devices_are_parsed_with_their_bus_ids():
    assert nvidia_smi.parse_devices(DEVICES) == {
        0: {"free": 80589 * MiB, "total": 81559 * MiB, "bus_id": "00000000:3B:00.0"},
        1: {"free": 1234 * MiB, "total": 81559 * MiB, "bus_id": "00000000:86:00.0"},
        2: {"free": None, "total": None, "bus_id": "00000000:AF:00.0"}}
    assert nvidia_smi.parse_devices("") == {}


def test_device_lines_without_a_bus_id_and_lines_that_are_not_devices():
    text = "garbage\nx, 1, 2\n0, 10, 20\n1, 2, 3, 4, 5\n"
    assert nvidia_smi.parse_devices(text) == {0: {"free": 10 * MiB, "total": 20 * MiB}}


def test_processes_are_parsed_with_lower_case_bus_ids():
    text = ("No running processes found\n"
            "x, 1, 00000000:86:00.0\n"
            "4242, 1000, 00000000:3B:00.0\n"
            "4244, [N/A], 00000000:86:00.0\n")
    assert nvidia_smi.parse_processes(text) == [
        (4242, 1000 * MiB, "00000000:3b:00.0"), (4244, None, "00000000:86:00.0")]
