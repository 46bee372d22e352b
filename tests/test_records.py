"""Unit and exit records (launchers/records.py): files under the runtime dir, so hostile
input. Every record that does not hold up is refused with a message that says why."""

import json
import os

import pytest

from backend_mgmt.launchers import records

UNIT = "backend-mgmt-demo-1234abcd.service"


def full_record(**changes):
    fields = dict(model="demo", unit=UNIT, endpoint="ipc:///run/x.sock", started_at=1.5e9,
                  stop_timeout=7.0, gpus="0,1", run="0123abcd0123abcd", definition="d" * 32,
                  pid=4242, invocation="abc", ready_at=1.6e9, protocols=("ping", "v2"))
    fields.update(changes)
    return records.UnitRecord(**fields)


def test_a_record_reads_back_as_it_was_written(tmp_path):
    for record in (full_record(), full_record(ready_at=None, protocols=None),
                   records.UnitRecord(model="m", unit=UNIT)):
        records.write_record(str(tmp_path), record)
        assert records.read_record(str(tmp_path), UNIT) == record
    assert records.read_record(str(tmp_path), "backend-mgmt-none.service") is None


def test_readiness_is_set_once_and_cleared():
    record = full_record(ready_at=None, protocols=None)
    assert records.ready(record, None) is record              # nothing to clear: no write
    ready = records.ready(record, ["ping"])
    assert ready.protocols == ("ping",) and ready.ready_at is not None
    # Already ready with those protocols: the same record, so an adopted backend keeps the
    # time it first became ready and nothing is written again.
    assert records.ready(ready, ["ping"]) is ready
    assert records.ready(ready, ["ping", "v2"]).protocols == ("ping", "v2")
    cleared = records.ready(ready, None)
    assert cleared.ready_at is None and cleared.protocols is None


def _document(**fields):
    return json.dumps({"model": "demo", "unit": UNIT, **fields})


@pytest.mark.parametrize("content, message", [
    ("not json", "not JSON"),
    ("[]", "not a JSON object"),
    ('{"unit": "%s"}' % UNIT, "field 'model' is not a str"),
    (_document(model=1), "field 'model' is not a str"),
    (json.dumps({"model": "m", "unit": "backend-mgmt-other.service"}), "names unit"),
    (_document(pid=1), "pid 1 is not a backend's"),
    (_document(pid=True), "field 'pid' is not a int"),
    (_document(started_at="x"), "field 'started_at' is not a float"),
    (_document(stop_timeout=-1), "stop_timeout -1.0 is out of range"),
    ('{"model": "m", "unit": "%s", "stop_timeout": 1e400}' % UNIT, "not a finite number"),
    ('{"model": "m", "unit": "%s", "started_at": NaN}' % UNIT, "not a finite number"),
    (_document(run="../x"), "run id '../x' is malformed"),
    (_document(endpoint="http://evil/"), "is not ipc:// or tcp://"),
    (_document(model="m" * 5000), "field 'model' is too long"),
    (_document(ready_at=1.0), "ready_at and protocols must be given together"),
    (_document(protocols=["ping"]), "ready_at and protocols must be given together"),
    (_document(ready_at=1.0, protocols="ping"), "field 'protocols' is not a list"),
    (_document(ready_at=1.0, protocols=[1]), "field 'protocols' is not a list"),
    (_document(ready_at=1.0, protocols=[""]), "field 'protocols' is not a list"),
    (_document(ready_at=1.0, protocols=["p"] * 65), "field 'protocols' is not a list"),
    (_document(x="y" * 70000), "larger than 65536 bytes"),
    (b"\xff\xfe garbage", "not JSON"),
])
def test_a_garbled_or_hostile_record_is_refused_with_a_reason(tmp_path, content, message):
    path = tmp_path / records.record_name(UNIT)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    with pytest.raises(records.BadRecord) as refused:
        records.read_record(str(tmp_path), UNIT)
    assert message in str(refused.value) and str(path) in str(refused.value)


def test_a_record_that_is_a_symlink_or_no_file_is_refused(tmp_path):
    path = tmp_path / records.record_name(UNIT)
    os.symlink("/etc/passwd", path)          # never followed
    with pytest.raises(records.BadRecord):
        records.read_record(str(tmp_path), UNIT)
    path.unlink()
    path.mkdir()
    with pytest.raises(records.BadRecord):
        records.read_record(str(tmp_path), UNIT)


@pytest.mark.parametrize("content, detail", [
    ("not json", "bad exit record"),
    (json.dumps({"unit": "backend-mgmt-other.service", "result": "success"}),
     "the record names another unit"),
    (json.dumps({"unit": UNIT, "result": ["x"], "exit_code": {"a": 1}}),
     "unit ended with result unknown"),
])
def test_a_garbled_exit_record_ends_the_run_with_an_unknown_status(tmp_path, content, detail):
    (tmp_path / records.exit_name(UNIT, "0123abcd0123abcd")).write_text(content)
    info, invocation = records.read_exit(str(tmp_path), UNIT, "0123abcd0123abcd")
    assert detail in info.describe() and invocation is None
