"""Log lines cannot be forged: one record is one line (a traceback aside, split on \\n only),
every other control character escaped, in the journal format and the plain one."""

import io
import logging
import os

import pytest

from backend_mgmt import logsetup

from harness import wait_until

FORGERIES = ["\u2028", "\u2029", "\u0085", "\r", "\x1b[2K\r", "\x00", "\x0b", "\x0c", "\x1c",
             "\x1d", "\x1e", "\n"]


def record(message, *args, level=logging.INFO, exc_info=None):
    return logging.LogRecord("backend_mgmt.backend", level, __file__, 1, message, args,
                             exc_info)


@pytest.mark.parametrize("separator", FORGERIES)
def test_journal_formatter_keeps_one_record_on_one_line(separator):
    formatter = logsetup.JournalFormatter("%(name)s: %(message)s")
    text = formatter.format(record("[%s] %s", "m", f"ok{separator}<3>backend_mgmt: forged"))
    assert text.split("\n") == text.splitlines() == [text], repr(text)
    assert text.startswith("<6>backend_mgmt.backend: [m] ok\\"), repr(text)
    assert text.endswith("<3>backend_mgmt: forged")
    assert not any(ch in text for ch in "\r\x00\x1b\x85\u2028\u2029")


def test_a_traceback_spans_lines_each_with_the_priority_and_escaped():
    formatter = logsetup.JournalFormatter("%(name)s: %(message)s")
    try:
        raise ValueError("bad\u2028<2>forged")
    except ValueError:
        import sys
        text = formatter.format(record("it failed", level=logging.ERROR,
                                       exc_info=sys.exc_info()))
    lines = text.split("\n")
    assert lines == text.splitlines() and len(lines) > 3
    assert all(line.startswith("<3>") for line in lines), lines
    assert lines[-1] == "<3>ValueError: bad\\u2028<2>forged"


def test_plain_formatter_escapes_too():
    stream = io.StringIO()
    logsetup.configure("INFO", "%(levelname)s %(message)s", None, stream=stream)
    try:
        logging.getLogger("x").info("a\rb\x1b[31mc\u2028d\te")
    finally:
        logging.getLogger().handlers[0].flush()
        logsetup.configure("WARNING", stream=io.StringIO())
    assert stream.getvalue() == "INFO a\\x0db\\x1b[31mc\\u2028d\te\n"


def test_a_child_backend_cannot_forge_daemon_lines_in_the_journal(daemon_factory, workdir):
    """The daemon's stderr is a file here; JOURNAL_STREAM naming that file makes the daemon
    log in the journal's format to it, as under systemd."""
    log_path = os.path.join(workdir, "daemon.log")
    open(log_path, "wb").close()
    info = os.stat(log_path)
    say = r"odd\u2028<3>backend_mgmt.daemon: forged one\r\x1b[2Kforged two\x00<2>forged three"
    daemon = daemon_factory({"liar": ["--say", say + r"\n", "--say", r"last\u0085line\n"]},
                            env={"JOURNAL_STREAM": f"{info.st_dev}:{info.st_ino}"})
    assert daemon.load("liar")["success"]
    wait_until(lambda: "last" in daemon.log(), 5, message="the backend's output")
    with open(log_path, "rb") as stream:
        raw = stream.read()
    lines = raw.split(b"\n")[:-1]
    assert lines and all(line[:1] == b"<" and line[2:3] == b">" for line in lines), lines
    text = raw.decode()
    assert "\u2028" not in text and "\r" not in text and "\x00" not in text and \
        "\x1b" not in text and "\x85" not in text
    ours = [line for line in text.split("\n") if "[liar] odd" in line]
    assert ours == ["<6>backend_mgmt.backend: [liar] odd\\u2028<3>backend_mgmt.daemon: forged "
                    "one\\x0d\\x1b[2Kforged two\\x00<2>forged three"], ours
    assert "<6>backend_mgmt.backend: [liar] last\\x85line" in text.split("\n")
