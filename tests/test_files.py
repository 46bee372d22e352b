"""files.write_atomic: the one way small files are written (metrics --output, unit and exit
records), also as root in directories others may write to."""

import os

import pytest

from backend_mgmt import files


def test_writes_and_replaces_atomically(tmp_path):
    target = tmp_path / "out.prom"
    files.write_atomic(str(target), "one\n")
    files.write_atomic(str(target), b"two\n", mode=0o640)
    assert target.read_text() == "two\n"
    assert os.stat(target).st_mode & 0o777 == 0o640
    assert os.listdir(tmp_path) == ["out.prom"]


def test_a_symlink_at_the_final_name_is_replaced_not_followed(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    target = tmp_path / "out.prom"
    target.symlink_to(victim)
    files.write_atomic(str(target), "metrics\n")
    assert victim.read_text() == "precious\n"
    assert not target.is_symlink() and target.read_text() == "metrics\n"


def test_symlinks_planted_at_predictable_temporary_names_are_never_opened(tmp_path):
    """The old code wrote to '<name>.tmp' (and '<name>.<pid>.tmp'): a symlink planted there
    made root write through it. The temporary's name is random and created O_EXCL|O_NOFOLLOW."""
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    target = tmp_path / "u.json"
    for name in ("u.json.tmp", f"u.json.{os.getpid()}.tmp", ".u.json.tmp"):
        (tmp_path / name).symlink_to(victim)
    files.write_atomic(str(target), "{}")
    assert victim.read_text() == "precious\n"
    assert target.read_text() == "{}"


def test_an_error_leaves_no_temporary_and_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "out"
    target.write_text("old")

    def failing_fsync(fd):
        raise OSError(5, "Input/output error")
    monkeypatch.setattr(os, "fsync", failing_fsync)   # a disk error: cannot be made for real
    with pytest.raises(files.WriteError, match=r"cannot write .*out: Input/output error"):
        files.write_atomic(str(target), "new")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["out"]


def test_a_missing_directory_is_one_clear_error(tmp_path):
    with pytest.raises(files.WriteError) as caught:
        files.write_atomic(str(tmp_path / "nope" / "out"), "x")
    assert str(caught.value) == f"cannot write {tmp_path}/nope/out: No such file or directory"


def test_open_nofollow_refuses_a_symlink(tmp_path):
    (tmp_path / "real").write_text("x")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(OSError):
        files.open_nofollow(str(tmp_path / "link"), os.O_RDWR)
