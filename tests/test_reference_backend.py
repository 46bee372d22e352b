"""The reference backend on its own, as a client of a backend would see it."""

import os
import signal
import subprocess
import sys

import pytest
import zmq

from backend_mgmt.messages import Request, Response
from harness import REPO, ping_backend, wait_until


@pytest.fixture
def backend(workdir):
    processes = []

    def start(*args, model="org/model"):
        endpoint = f"ipc://{workdir}/b.sock"
        process = subprocess.Popen(
            [sys.executable, "-m", "backend_mgmt.reference_backend", "--ipc-endpoint", endpoint,
             "--model-name", model, *args], env={**os.environ, "PYTHONPATH": REPO},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        processes.append(process)
        wait_until(lambda: os.path.exists(endpoint[6:]) or process.poll() is not None, 10)
        return process, endpoint
    yield start
    for process in processes:
        process.kill()
        process.wait(5)


def test_handshake_then_ping(backend):
    process, endpoint = backend()
    context = zmq.Context()
    try:
        pong = ping_backend(context, endpoint, "x" * 1000, 2**32 - 1)
        assert pong.message == "x" * 1000 and pong.correlation_id == 2**32 - 1
    finally:
        context.destroy(linger=0)


def test_handshake_naming_another_model_is_refused(backend):
    process, endpoint = backend()
    context = zmq.Context()
    sock = context.socket(zmq.DEALER)
    sock.connect(endpoint)
    try:
        sock.send(Request(requested_model="other").SerializeToString())
        assert sock.poll(5000)
        assert "serves org/model, not other" in Response.FromString(sock.recv()).error_message
    finally:
        sock.close(linger=0)
        context.destroy(linger=0)


def test_sigterm_stops_it_with_code_0(backend):
    process, endpoint = backend()
    process.send_signal(signal.SIGTERM)
    assert process.wait(5) == 0
    assert "stopped by SIGTERM" in process.stdout.read()


def test_fail_at_start(backend):
    process, endpoint = backend("--fail-at-start", "9")
    assert process.wait(5) == 9
