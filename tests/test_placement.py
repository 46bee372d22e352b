"""GPU placement and byte sizes: pure functions, plus nvidia-smi's output parsed from a capture.

This machine has no GPU and no nvidia-smi: query_nvidia_smi is run against a stand-in for
subprocess.run, and its parser against output captured from a real nvidia-smi.
"""

import shutil
import subprocess

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from proptest import examples

from backend_mgmt import placement
from backend_mgmt.placement import Assignment, Gpu, Need, Plan
from backend_mgmt.sizes import SIZE_SCHEMA, format_size, parse_size

GiB = 1024 ** 3


# -- sizes ---------------------------------------------------------------------------------
@pytest.mark.parametrize("text, size", [
    (0, 0), (4096, 4096), ("1024", 1024), ("80GiB", 80 * GiB), ("20G", 20 * 10 ** 9),
    ("512M", 512 * 10 ** 6), ("1.5GiB", 3 * GiB // 2), ("10KiB", 10240), ("2T", 2 * 10 ** 12),
    ("2Ti", 2 * 1024 ** 4), ("1P", 10 ** 15), ("20GB", 20 * 10 ** 9), ("20gib", 20 * GiB),
    ("20 GiB", 20 * GiB), ("  7 mi ", 7 * 1024 ** 2), ("3B", 3), ("3b", 3), (".5K", 500),
    ("1.1T", 1_100_000_000_000),            # exact: no float rounding a byte away
    ("1.5", 1),                             # fractions of a byte are dropped
])
def test_sizes_in_every_accepted_form(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", [
    "", " ", "GiB", "-1", -1, "1.", "1..5G", "1e9", "20 GiBs", "20 X", "20iB", "0x10",
    "1 000", "٣G", None, 1.5, True, [], "20 G B",
])
def test_invalid_sizes_are_refused_clearly(text):
    with pytest.raises(ValueError, match="negative|not a number of bytes"):
        parse_size(text)


def test_the_schema_pattern_accepts_exactly_what_the_parser_accepts():
    validator = jsonschema.Draft7Validator(SIZE_SCHEMA)
    for text in ["80GiB", "20G", "512M", "1.5GiB", "1024", 1024, "2T", " 1 gib "]:
        assert validator.is_valid(text)
    for text in ["", "GiB", "-1", -1, "1.", "1e9", "20 GiBs", "20 X", 1.5]:
        assert not validator.is_valid(text)


@given(st.text(alphabet="0123456789.kKmMgGtTpPiIbBx -", max_size=8))
@settings(max_examples=examples(500), deadline=None, database=None)
def test_parser_and_schema_pattern_agree(text):
    try:
        parse_size(text)
        parsed = True
    except ValueError:
        parsed = False
    assert jsonschema.Draft7Validator(SIZE_SCHEMA).is_valid(text) == parsed


@pytest.mark.parametrize("size, shown", [
    (0, "0 B"), (512, "512 B"), (1024, "1 KiB"), (1536, "1.5 KiB"), (20 * GiB, "20 GiB"),
    (80 * 10 ** 9, "74.5 GiB"), (3 * 1024 ** 4, "3 TiB"), (None, "unknown"),
])
def test_sizes_for_people(size, shown):
    assert format_size(size) == shown


# -- gpus: and resources: ------------------------------------------------------------------
def test_gpus_from_config_bare_ids_and_mappings():
    assert placement.parse_gpus([0, {"id": 1, "memory": "80GiB"}, {"id": "GPU-3f2a"},
                                 {"id": 2, "memory": 1000}]) == (
        Gpu(0, None), Gpu(1, 80 * GiB), Gpu("GPU-3f2a", None), Gpu(2, 1000))
    assert placement.parse_gpus(None) == ()
    assert placement.parse_gpus([]) == ()


@pytest.mark.parametrize("config, message", [
    ([0, 0], "listed twice"), ([0, "0"], "listed twice"),
    ([0, {"id": 0, "memory": "1G"}], "listed twice"), ([{"memory": "1G"}], "has no id"),
    ([True], "has no id"), ([""], "has no id"), ([1.5], "has no id"),
    ([{"id": 0, "memory": "lots"}], "not a number of bytes"),
])
def test_bad_gpus_are_refused(config, message):
    with pytest.raises(ValueError, match=message):
        placement.parse_gpus(config)


def test_need_from_resources():
    assert placement.parse_need({"gpus": 2, "gpu_memory": "20GiB"}) == Need(2, 20 * GiB)
    assert placement.parse_need({"gpus": 1}) == Need(1, 0)
    assert placement.parse_need(None) == Need(0, 0)
    assert placement.parse_need({}).devices == 0
    assert placement.parse_need({"gpu_memory": "1G"}).devices == 1   # memory alone: one GPU
    for bad in [-1, "2", True, 1.5]:
        with pytest.raises(ValueError, match="not a number of GPUs"):
            placement.parse_need({"gpus": bad})


# -- place ---------------------------------------------------------------------------------
FOUR = (Gpu(0, 80 * GiB), Gpu(1, 40 * GiB), Gpu(2, 80 * GiB), Gpu(3, 24 * GiB))


def test_no_need_no_devices():
    assert placement.place(FOUR, {}, Need()) == ()
    assert placement.place((), {}, Need()) == ()


def test_whole_devices_are_not_shared():
    gpus = (Gpu(0, None), Gpu(1, None))
    assert placement.place(gpus, {}, Need(count=2)) == (0, 1)
    first = placement.place(gpus, {}, Need(count=1))
    assert first == (0,)
    held = {"a": Assignment(first, 0)}
    assert placement.place(gpus, held, Need(count=1)) == (1,)
    assert placement.place(gpus, held, Need(count=2)) is None
    held["b"] = Assignment((1,), 0)
    assert placement.place(gpus, held, Need(count=1)) is None


def test_whole_devices_go_to_undeclared_then_smallest_devices():
    gpus = (Gpu(0, 80 * GiB), Gpu(1, None), Gpu(2, 24 * GiB))
    assert placement.place(gpus, {}, Need(count=1)) == (1,)
    assert placement.place(gpus, {}, Need(count=2)) == (1, 2)
    assert placement.place(gpus, {}, Need(count=3)) == (1, 2, 0)


def test_a_device_held_whole_has_no_memory_left_and_a_shared_one_is_not_whole():
    held = {"whole": Assignment((0,), 0), "share": Assignment((1,), GiB)}
    assert placement.free_memory(FOUR, held) == {0: 0, 1: 39 * GiB, 2: 80 * GiB, 3: 24 * GiB}
    assert placement.place(FOUR, held, Need(memory=30 * GiB)) == (1,)   # 0 is held whole
    assert placement.place(FOUR, held, Need(count=2)) == (3, 2)


def test_memory_needs_declared_memory():
    gpus = (Gpu(0, None), Gpu(1, 16 * GiB))
    assert placement.place(gpus, {}, Need(memory=GiB)) == (1,)
    assert placement.place(gpus, {}, Need(count=2, memory=GiB)) is None
    assert placement.place(gpus[:1], {}, Need(memory=GiB)) is None


def test_memory_best_fit_keeps_the_roomiest_devices_free():
    assert placement.place(FOUR, {}, Need(memory=20 * GiB)) == (3,)
    assert placement.place(FOUR, {}, Need(memory=30 * GiB)) == (1,)
    assert placement.place(FOUR, {}, Need(memory=60 * GiB)) == (0,)      # tie: config order
    assert placement.place(FOUR, {}, Need(count=2, memory=30 * GiB)) == (1, 0)
    held = {"a": Assignment((0,), 70 * GiB)}
    assert placement.place(FOUR, held, Need(memory=10 * GiB)) == (0,)  # exactly fills GPU 0
    assert placement.place(FOUR, held, Need(memory=11 * GiB)) == (3,)


def test_filling_a_host_with_equal_shares_uses_every_slot_once():
    held, n = {}, 0
    while (devices := placement.place(FOUR, held, Need(memory=20 * GiB))) is not None:
        held[f"m{n}"] = Assignment(devices, 20 * GiB)
        n += 1
    assert n == 4 + 2 + 4 + 1
    assert placement.free_memory(FOUR, held) == {0: 0, 1: 0, 2: 0, 3: 4 * GiB}
    assert placement.place(FOUR, held, Need(count=1)) is None


def test_assignments_on_devices_no_longer_declared_are_ignored():
    held = {"old": Assignment((7,), 10 * GiB), "older": Assignment(("GPU-x",), 0)}
    assert placement.free_memory(FOUR, held) == {0: 80 * GiB, 1: 40 * GiB, 2: 80 * GiB,
                                                 3: 24 * GiB}


def test_ids_match_across_int_and_str():
    gpus = (Gpu("0", 10 * GiB), Gpu(1, 10 * GiB))
    held = {"a": Assignment((0,), 6 * GiB), "b": Assignment(("1",), 0)}
    assert placement.free_memory(gpus, held) == {"0": 4 * GiB, 1: 0}
    assert placement.place(gpus, held, Need(memory=5 * GiB)) is None


@st.composite
def hosts(draw):
    count = draw(st.integers(0, 5))
    memories = draw(st.lists(st.one_of(st.none(), st.integers(1, 100)),
                             min_size=count, max_size=count))
    ids = draw(st.permutations(list(range(count)) + [f"GPU-{n}" for n in range(count)]))
    return tuple(Gpu(gpu_id, memory) for gpu_id, memory in zip(ids, memories))


needs = st.builds(Need, count=st.integers(0, 4), memory=st.one_of(st.just(0),
                                                                   st.integers(1, 60)))


@given(hosts(), st.lists(st.tuples(st.booleans(), needs, st.integers(0, 20)), max_size=40))
@settings(max_examples=examples(800), deadline=None, database=None)
def test_no_sequence_of_placements_and_removals_overbooks_a_device(gpus, steps):
    held = {}
    for n, (add, need, pick) in enumerate(steps):
        if not add and held:
            del held[sorted(held)[pick % len(held)]]
            continue
        devices = placement.place(gpus, held, need)
        if devices is None:
            continue
        assert len(devices) == need.devices == len(set(map(str, devices)))
        held[f"m{n}"] = Assignment(devices, need.memory)
        for gpu in gpus:
            on_it = [memory for ds, memory in held.values() if str(gpu.id) in map(str, ds)]
            if 0 in on_it:                      # held whole: by that model alone
                assert len(on_it) == 1
            elif on_it:
                assert gpu.memory is not None and sum(on_it) <= gpu.memory


# -- never_fits and plan_with_eviction -----------------------------------------------------
def test_needs_that_never_fit_say_why():
    assert placement.never_fits(FOUR, Need(count=4, memory=24 * GiB)) is None
    assert "needs 5 GPUs, the host has 4" in placement.never_fits(FOUR, Need(count=5))
    assert "has none" in placement.never_fits((), Need(memory=1))
    assert "3 GPU(s)" in placement.never_fits(FOUR, Need(count=3, memory=41 * GiB)) and \
        "2 GPU(s) in gpus: have that much" in placement.never_fits(FOUR, Need(count=3,
                                                                           memory=41 * GiB))
    assert "no GPU in gpus: declares its memory" in placement.never_fits(
        (Gpu(0, None),), Need(memory=GiB))
    assert placement.plan_with_eviction(FOUR, {}, Need(count=5), ["a"]) is None


def test_no_eviction_when_there_is_room():
    held = {"a": Assignment((0,), 10 * GiB)}
    assert placement.plan_with_eviction(FOUR, held, Need(memory=10 * GiB), ["a"]) == \
        Plan((3,), [])


def test_evicts_the_least_recently_used_prefix():
    gpus = (Gpu(0, 40 * GiB),)
    held = {name: Assignment((0,), 10 * GiB) for name in "abcd"}
    lru = ["c", "a", "d", "b"]
    assert placement.plan_with_eviction(gpus, held, Need(memory=10 * GiB), lru) == \
        Plan((0,), ["c"])
    assert placement.plan_with_eviction(gpus, held, Need(memory=30 * GiB), lru) == \
        Plan((0,), ["c", "a", "d"])


def test_spares_models_in_the_prefix_whose_eviction_does_not_help():
    gpus = (Gpu(0, 40 * GiB), Gpu(1, 40 * GiB))
    held = {"old-small": Assignment((0,), 5 * GiB), "cpu-only": Assignment((), 0),
            "old-big": Assignment((1,), 35 * GiB), "new": Assignment((0,), 30 * GiB)}
    plan = placement.plan_with_eviction(gpus, held, Need(memory=30 * GiB),
                                        ["old-small", "cpu-only", "old-big", "new"])
    assert plan == Plan((1,), ["old-big"])


def test_minimal_set_keeps_lru_order():
    gpus = (Gpu(0, 20 * GiB), Gpu(1, 20 * GiB))
    held = {"a": Assignment((0,), 10 * GiB), "b": Assignment((1,), 10 * GiB),
            "c": Assignment((1,), 10 * GiB), "d": Assignment((0,), 10 * GiB)}
    # The shortest prefix is a, b, c; with b and c gone GPU 1 is empty, so a can stay.
    assert placement.plan_with_eviction(gpus, held, Need(memory=15 * GiB),
                                        ["a", "b", "c", "d"]) == Plan((1,), ["b", "c"])


def test_none_when_evicting_every_candidate_is_not_enough():
    gpus = (Gpu(0, 40 * GiB),)
    held = {"pinned": Assignment((0,), 20 * GiB), "idle": Assignment((0,), 20 * GiB)}
    # The caller leaves pinned and loading models out of the candidates.
    assert placement.plan_with_eviction(gpus, held, Need(memory=30 * GiB), ["idle"]) is None
    assert placement.never_fits(gpus, Need(memory=30 * GiB)) is None   # so: wait, not fail
    assert placement.plan_with_eviction(gpus, held, Need(memory=20 * GiB), ["idle"]) == \
        Plan((0,), ["idle"])
    assert placement.plan_with_eviction(gpus, held, Need(memory=20 * GiB), []) is None


@given(hosts(), st.lists(needs, max_size=8), needs, st.randoms(use_true_random=False))
@settings(max_examples=examples(500), deadline=None, database=None)
def test_eviction_plans_fit_and_cannot_be_trimmed(gpus, loaded, need, rng):
    held = {}
    for n, load in enumerate(loaded):
        devices = placement.place(gpus, held, load)
        if devices is not None:
            held[f"m{n}"] = Assignment(devices, load.memory)
    candidates = list(held)
    rng.shuffle(candidates)
    candidates = candidates[:rng.randint(0, len(candidates))]
    plan = placement.plan_with_eviction(gpus, held, need, candidates)
    everyone_gone = {n: a for n, a in held.items() if n not in candidates}
    if plan is None:
        assert placement.place(gpus, everyone_gone, need) is None \
            or placement.never_fits(gpus, need)
        return
    assert [n for n in candidates if n in plan.evict] == plan.evict     # LRU order kept
    rest = {n: a for n, a in held.items() if n not in plan.evict}
    assert placement.place(gpus, rest, need) == plan.devices
    for name in plan.evict:                                             # none to spare
        assert placement.place(gpus, {**rest, name: held[name]}, need) is None


# -- for backends and status ---------------------------------------------------------------
def test_cuda_environment():
    assert placement.cuda_visible_devices((0, 2)) == "0,2"
    assert placement.cuda_visible_devices(("GPU-3f2a",)) == "GPU-3f2a"
    assert placement.cuda_visible_devices(()) == ""
    assert placement.cuda_environment((1,)) == {"CUDA_DEVICE_ORDER": "PCI_BUS_ID",
                                                "CUDA_VISIBLE_DEVICES": "1"}


def test_device_status_with_and_without_the_driver():
    gpus = (Gpu(0, 80 * GiB), Gpu("GPU-3f2a", None), Gpu("1", 40 * GiB))
    held = {"a": Assignment((0,), 20 * GiB), "b": Assignment(("GPU-3f2a",), 0)}
    assert placement.device_status(gpus, held) == [
        {"id": 0, "memory": 80 * GiB, "free": 60 * GiB, "models": ["a"]},
        {"id": "GPU-3f2a", "memory": None, "free": None, "models": ["b"]},
        {"id": "1", "memory": 40 * GiB, "free": 40 * GiB, "models": []}]
    measured = {0: {"free": 50 * GiB, "total": 80 * GiB}, 1: {"free": 1, "total": 2}}
    status = placement.device_status(gpus, held, measured)
    assert status[0]["measured_free"] == 50 * GiB and status[0]["measured_total"] == 80 * GiB
    assert "measured_free" not in status[1]            # a UUID cannot be matched to an index
    assert status[2]["measured_free"] == 1


# -- nvidia-smi (no GPU here: a captured sample and a stand-in for subprocess.run) ----------
SAMPLE = """\
0, 80589, 81559
1, 1234, 81559
2, [N/A], [N/A]
No devices were found
"""


def test_nvidia_smi_output_is_parsed():
    MiB = 1024 ** 2
    assert placement.parse_nvidia_smi(SAMPLE) == {
        0: {"free": 80589 * MiB, "total": 81559 * MiB},
        1: {"free": 1234 * MiB, "total": 81559 * MiB},
        2: {"free": None, "total": None}}
    assert placement.parse_nvidia_smi("") == {}


def test_nvidia_smi_bus_ids_are_kept():
    # NVIDIA_SMI asks for the PCI bus id as a fourth column: the per-process query names
    # devices by it. A line with more columns is not one of ours.
    MiB = 1024 ** 2
    text = ("0, 80589, 81559, 00000000:01:00.0\n"
            "1, [N/A], [N/A], 00000000:41:00.0\n"
            "2, 1, 2, 00000000:81:00.0, extra\n")
    assert placement.parse_nvidia_smi(text) == {
        0: {"free": 80589 * MiB, "total": 81559 * MiB, "bus_id": "00000000:01:00.0"},
        1: {"free": None, "total": None, "bus_id": "00000000:41:00.0"}}


def fake_run(stdout="", returncode=0, raises=None):
    calls = []

    def run(argv, **options):
        calls.append((argv, options))
        if raises:
            raise raises
        return subprocess.CompletedProcess(argv, returncode, stdout, "")
    return run, calls


def test_query_nvidia_smi_reads_the_driver_with_a_timeout():
    run, calls = fake_run(SAMPLE)
    assert placement.query_nvidia_smi(run, timeout=2)[1]["free"] == 1234 * 1024 ** 2
    argv, options = calls[0]
    assert argv == ["nvidia-smi", "--query-gpu=index,memory.free,memory.total,pci.bus_id",
                    "--format=csv,noheader,nounits"]
    assert options["timeout"] == 2


@pytest.mark.parametrize("run", [
    fake_run(raises=FileNotFoundError("nvidia-smi"))[0],
    fake_run(raises=subprocess.TimeoutExpired("nvidia-smi", 5))[0],
    fake_run(raises=PermissionError())[0],
    fake_run("NVIDIA-SMI has failed because it couldn't communicate", returncode=9)[0],
    fake_run("No devices were found\n")[0],
])
def test_query_nvidia_smi_is_none_without_a_working_driver(run):
    assert placement.query_nvidia_smi(run) is None


def test_query_nvidia_smi_on_this_machine():
    result = placement.query_nvidia_smi(timeout=10)
    if shutil.which(placement.NVIDIA_SMI[0]) is None:
        assert result is None          # no driver: status and placement use declared numbers
        return
    if result is None:
        pytest.skip("nvidia-smi is installed but reports no working GPU")
    assert result and all({"free", "total"} <= set(v) for v in result.values())
