"""Journal fields (journal.py): records sent to a real unix datagram socket standing in for
journald's, read back and decoded as journald would. The booted-systemd system test checks
the real journal (journalctl BACKEND_MGMT_MODEL=...)."""

import logging
import os
import socket

import pytest

from backend_mgmt import journal


@pytest.fixture
def journald(tmp_path):
    address = str(tmp_path / "journal.socket")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(5)
    yield address, sock
    sock.close()


class Collect(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records = []

    def emit(self, record):
        self.records.append(record)


def logger_to(address, fallback):
    handler = journal.native_handler(fallback, address)
    logger = logging.getLogger("backend_mgmt.test_journal")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    return logger, handler


def test_lines_about_a_model_carry_its_name_and_keep_their_priority(journald):
    address, sock = journald
    logger, handler = logger_to(address, Collect())
    try:
        logger.warning("model %s: loading -> failed (%s)", "demo", "exited with code 3")
        logger.info("[%s] %s", "my model", "a line the backend printed")
        logger.info("reloading the configuration", extra={"model": "explicit"})
        logger.error("backends still not gone: %s", "demo")
        received = [journal.decode(sock.recv(65536)) for _ in range(4)]
    finally:
        handler.close()
    first, output, explicit, other = received
    assert first["MESSAGE"] == ("backend_mgmt.test_journal: model demo: loading -> failed "
                                "(exited with code 3)")
    assert (first["PRIORITY"], first["BACKEND_MGMT_MODEL"]) == ("4", "demo")
    assert first["SYSLOG_IDENTIFIER"] == "backend-mgmt"
    assert (output["PRIORITY"], output["BACKEND_MGMT_MODEL"]) == ("6", "my model")
    assert explicit["BACKEND_MGMT_MODEL"] == "explicit"
    assert other["PRIORITY"] == "3" and "BACKEND_MGMT_MODEL" not in other


def test_a_multi_line_message_stays_one_entry_in_the_binary_form(journald):
    address, sock = journald
    logger, handler = logger_to(address, Collect())
    try:
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("model %s: internal error", "a\nb")
        datagram = sock.recv(65536)
    finally:
        handler.close()
    fields = journal.decode(datagram)
    assert b"MESSAGE\n" in datagram            # length-prefixed, not MESSAGE=
    assert "Traceback" in fields["MESSAGE"] and "ValueError: boom" in fields["MESSAGE"]
    assert fields["BACKEND_MGMT_MODEL"] == "a\nb" and fields["PRIORITY"] == "3"


def test_what_cannot_be_sent_goes_to_the_stream_instead(journald, tmp_path):
    address, sock = journald
    fallback = Collect()
    logger, handler = logger_to(address, fallback)
    sock.close()
    os.unlink(address)          # journald gone
    try:
        logger.info("model %s: ready", "demo")
    finally:
        handler.close()
    assert [r.getMessage() for r in fallback.records] == ["model demo: ready"]


def test_no_journald_socket_means_no_native_handler(tmp_path):
    assert journal.native_handler(Collect(), str(tmp_path / "missing")) is None


def test_configure_escapes_control_characters_in_native_entries_too(journald, tmp_path,
                                                                    monkeypatch):
    """What the daemon sends natively is escaped as its stream lines are (logsetup): a
    backend's output cannot carry terminal escapes or line separators into the journal."""
    from backend_mgmt import logsetup
    address, sock = journald
    stream = open(tmp_path / "stream", "w")
    info = os.fstat(stream.fileno())
    monkeypatch.setenv("JOURNAL_STREAM", f"{info.st_dev}:{info.st_ino}")
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        logsetup.configure("INFO", stream=stream, journal_socket=address)
        logging.getLogger("backend_mgmt.backend").info("[%s] %s", "demo",
                                                       "evil\u2028forged\x1b[31m line")
        fields = journal.decode(sock.recv(65536))
    finally:
        for handler in root.handlers:
            handler.close()
        root.handlers[:], level = saved
        root.setLevel(level)
        stream.close()
    assert fields["MESSAGE"] == "backend_mgmt.backend: [demo] evil\\u2028forged\\x1b[31m line"
    assert fields["BACKEND_MGMT_MODEL"] == "demo"
