"""Details of the pure modules (placement, sizes, states, wire) that packaging/mutation-test
found untested. Fast, in-process."""

import pytest

from backend_mgmt import errors, placement, sizes, states, wire
from backend_mgmt.errors import ServiceError
from backend_mgmt.placement import Assignment, Gpu, Need, Plan

GiB = 1024 ** 3


def test_never_fits_messages_in_full():
    assert placement.never_fits((), Need(count=1)) == "needs 1 GPU, the host has none (gpus:)"
    assert placement.never_fits((Gpu(0, None),), Need(count=2)) == \
        "needs 2 GPUs, the host has 1 (gpus:)"
    assert placement.never_fits((Gpu(0, None),), Need(memory=GiB)) == \
        "needs 1 GiB of GPU memory but no GPU in gpus: declares its memory"
    assert placement.never_fits((Gpu(0, GiB),), Need(memory=2 * GiB)) == \
        "needs 2 GiB on each of 1 GPU(s), 0 GPU(s) in gpus: have that much"


def test_eviction_candidates_that_hold_nothing_are_skipped():
    gpus = (Gpu(0, 40 * GiB),)
    held = {"a": Assignment((0,), 30 * GiB)}
    # "cpu" is loaded but holds no GPU (not in assignments at all): evicting it frees nothing.
    assert placement.plan_with_eviction(gpus, held, Need(memory=20 * GiB), ["cpu", "a"]) == \
        Plan((0,), ["a"])


def test_sizes_in_the_largest_unit():
    assert sizes.format_size(1024 ** 5) == "1 PiB"
    assert sizes.format_size(1024 ** 6) == "1024 PiB"
    assert sizes.format_size(None) == "unknown"


def test_allowed_for_a_state_it_does_not_know():
    assert states.allowed("bogus", states.LOADING) is False


def test_split_envelope_with_an_empty_identity():
    with pytest.raises(ServiceError) as caught:
        wire.split_envelope([b"", b"x", b"", b"y"])
    assert caught.value.envelope.frames == (b"", b"x", b"")


def test_more_error_messages():
    with pytest.raises(ValueError, match="^not a control reply$"):
        wire.decode_control_reply(b"[]")
    with pytest.raises(ServiceError) as caught:
        wire.parse_control(b"{")
    assert caught.value.code == errors.BAD_JSON
    assert caught.value.message.startswith("request is not UTF-8 JSON: Expecting")
