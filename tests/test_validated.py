"""Configuration bytes validated once are not validated again (validated.py): by reloads, and
by the next daemon's start-up through a record in the runtime dir that nobody else can forge.
Each test says the break of the code it was seen to fail against."""

import os
import signal
import threading

import pytest
import yaml

from backend_mgmt import validated
from backend_mgmt.validated import RECORD_NAME, ValidatedBytes
from harness import wait_until
from test_promises import children_running

SPARED = "not validated again"
NOBODY = 65534


def trusted_directory(tmp_path):
    directory = tmp_path / "run"
    directory.mkdir(mode=0o700)
    return str(directory)


def recorded(directory, data):
    bytes_ = ValidatedBytes(directory)
    bytes_.accept(data)
    bytes_.record()
    return os.path.join(directory, RECORD_NAME)


# -- the record ---------------------------------------------------------------------------------

def test_a_record_vouches_only_for_the_exact_bytes_it_was_written_for(tmp_path):
    """Broken by: vouches_for comparing only that a record exists (any bytes passed)."""
    directory = trusted_directory(tmp_path)
    recorded(directory, b"a: 1\n")
    assert ValidatedBytes(directory).vouches_for(b"a: 1\n")
    assert not ValidatedBytes(directory).vouches_for(b"a: 1\n# a comment\n")
    assert not ValidatedBytes(directory).vouches_for(None)


def test_a_record_of_another_validator_vouches_for_nothing(tmp_path, monkeypatch):
    """Broken by: leaving the validator's identity out of record_text. A new schema or new
    checks may refuse what the old ones let through."""
    directory = trusted_directory(tmp_path)
    recorded(directory, b"a: 1\n")
    monkeypatch.setattr(validated, "__version__", "0.0.0-other")
    assert not ValidatedBytes(directory).vouches_for(b"a: 1\n")


def forge_by_owner(path, directory):
    os.chown(path, NOBODY, -1)


def forge_by_mode(path, directory):
    os.chmod(path, 0o622)             # anyone could have rewritten it


def forge_by_directory(path, directory):
    os.chmod(directory, 0o777)        # anyone could have replaced it


def forge_by_symlink(path, directory):
    elsewhere = os.path.join(os.path.dirname(directory), "elsewhere")
    os.rename(path, elsewhere)
    os.symlink(elsewhere, path)


@pytest.mark.parametrize("forge", [forge_by_owner, forge_by_mode, forge_by_directory,
                                   forge_by_symlink])
def test_a_record_someone_else_could_have_written_is_not_trusted(tmp_path, forge):
    """Broken by: read_record not checking owner and mode (_owned_by_us_alone returning True):
    the owner, mode and directory cases fail; by dropping O_NOFOLLOW: the symlink case."""
    if forge is forge_by_owner and os.geteuid() != 0:
        pytest.skip("only root can give a file to another user")
    directory = trusted_directory(tmp_path)
    path = recorded(directory, b"a: 1\n")
    assert ValidatedBytes(directory).vouches_for(b"a: 1\n")     # before: trusted
    forge(path, directory)
    assert not ValidatedBytes(directory).vouches_for(b"a: 1\n")


def test_no_record_is_written_into_a_directory_others_may_write(tmp_path):
    """Broken by: record() not checking the directory (check_trusted_directory)."""
    directory = trusted_directory(tmp_path)
    os.chmod(directory, 0o777)
    recorded(directory, b"a: 1\n")
    assert not os.path.exists(os.path.join(directory, RECORD_NAME))


def test_a_stopping_daemon_records_nothing_more(tmp_path):
    """Broken by: record() ignoring forget(): a reload that ends during the stop would leave a
    record behind in the runtime dir."""
    directory = trusted_directory(tmp_path)
    bytes_ = ValidatedBytes(directory, running=b"a: 1\n")
    bytes_.record()
    bytes_.forget()
    assert not os.path.exists(os.path.join(directory, RECORD_NAME))
    bytes_.accept(b"a: 2\n")
    bytes_.record()
    assert not os.path.exists(os.path.join(directory, RECORD_NAME))


# -- the daemon's start-up ----------------------------------------------------------------------

def crash(daemon):
    """End the daemon as a crash would. (A restart under systemd leaves the record as a crash
    does; a stop removes it, and the harness's SIGTERM is a stop.)"""
    daemon.process.send_signal(signal.SIGKILL)
    daemon.process.wait(10)


def restart(daemon):
    """The daemon again, after a crash, with the same config file and runtime dir."""
    crash(daemon)
    daemon.start()
    return daemon


def starting_watching_validation(daemon):
    """Start the daemon again; how many validating children it ran on the way."""
    seen, stop = set(), threading.Event()
    crash(daemon)
    daemon.start(wait=False)
    watcher = threading.Thread(target=children_running,
                               args=(daemon, "backend_mgmt.validate", seen, stop))
    watcher.start()
    try:
        wait_until(daemon._answers, 10, 0.02, "the daemon to answer status")
    finally:
        stop.set()
        watcher.join(5)
    return len(seen)


def edit_config(daemon, **changes):
    with open(daemon.config_path) as stream:
        document = yaml.safe_load(stream)
    document.update(changes)
    with open(daemon.config_path, "w") as stream:
        yaml.safe_dump(document, stream)
    with open(daemon.config_path, "rb") as stream:
        return stream.read()


def refused_start(daemon):
    """The daemon's exit code and log when started again (it is expected not to serve)."""
    crash(daemon)
    daemon.start(wait=False)
    return daemon.process.wait(20), daemon.log()


def test_a_restart_with_unchanged_bytes_runs_no_validation(daemon_factory):
    """Broken by: load_config always validating in the child (no record read): the log line
    is missing and a validating child is seen. And by vouches_for leaving _recorded False:
    the record is written again."""
    daemon = daemon_factory({"a": []})
    assert SPARED not in daemon.log()
    record = os.path.join(daemon.runtime_dir, RECORD_NAME)
    wait_until(lambda: os.path.exists(record), 5, message="the record, written after READY=1")
    written = os.stat(record).st_ino
    assert starting_watching_validation(daemon) == 0
    assert SPARED in daemon.log()
    assert daemon.request("status")["success"]
    assert os.stat(record).st_ino == written        # it said so already: not written again


def test_changed_bytes_are_validated_again_at_start(daemon_factory):
    """Broken by: vouches_for answering True whenever a trusted record exists: the daemon
    starts with a key the schema refuses."""
    daemon = daemon_factory({"a": []})
    edit_config(daemon, not_a_setting=1)          # only the schema refuses this
    code, log = refused_start(daemon)
    assert code == 78
    assert "not_a_setting" in log


def test_a_forged_record_does_not_spare_a_validation(daemon_factory):
    """Broken by: read_record not checking the record's owner and mode (_owned_by_us_alone
    returning True). A record of bytes the schema refuses, as only the daemon's user could
    write it, would be trusted (shown first); one anybody could have written is not."""
    daemon = daemon_factory({"a": []})
    data = edit_config(daemon, not_a_setting=1)
    path = recorded(daemon.runtime_dir, data)
    restart(daemon)                             # trusted: what the record is worth
    assert SPARED in daemon.log()
    os.chmod(path, 0o666)
    code, log = refused_start(daemon)
    assert code == 78
    assert "not_a_setting" in log.rsplit(SPARED, 1)[-1]


def test_the_daemons_own_checks_run_on_bytes_a_record_vouches_for(daemon_factory):
    """Broken by: load_config converting vouched bytes without config.validate's own checks
    (from_validated instead of from_unchanged): the daemon starts with an unknown default."""
    daemon = daemon_factory({"a": []})
    data = edit_config(daemon, default_model="nonesuch")
    recorded(daemon.runtime_dir, data)
    code, log = refused_start(daemon)
    assert code == 78
    assert "default_model: unknown model 'nonesuch'" in log


def test_a_reload_records_the_bytes_it_applied_for_the_next_start(daemon_factory):
    """Broken by: Reloader._validated not calling record(): the restart validates again."""
    daemon = daemon_factory({"a": []})
    edit_config(daemon, max_loaded_models=3)
    reply = daemon.request("reload-config", timeout=30)
    assert reply["success"] and reply["data"]["changed"] is True
    assert starting_watching_validation(daemon) == 0
    assert daemon.request("status")["data"]["max_loaded_models"] == 3


def test_a_stop_leaves_no_record_behind(daemon_factory):
    """Broken by: begin_shutdown not calling forget(): the record stays after a stop."""
    daemon = daemon_factory({"a": []})
    record = os.path.join(daemon.runtime_dir, RECORD_NAME)
    wait_until(lambda: os.path.exists(record), 5, message="the record")
    assert daemon.terminate() == 0
    assert not os.path.exists(record)
