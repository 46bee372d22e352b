"""The client side of the control protocol, for the CLI (and tests, and scripts)."""

import os
import time
import uuid

import zmq

from . import config as config_module, runtime, wire


class Unreachable(Exception):
    """The daemon is not there (no socket, refused, or no answer in time)."""


def control_endpoint(cfg=None, environ=os.environ):
    """Where the CLI finds the daemon: the config's endpoint, else the runtime dir's socket.

    Without a configured runtime_dir, the system one (/run/backend-mgmt) is preferred when its
    socket exists, so a non-root member of the group reaches the system daemon.
    """
    if environ.get("BACKEND_MGMT_CONTROL"):
        return environ["BACKEND_MGMT_CONTROL"]
    if cfg is not None and cfg.cli_management:
        return cfg.cli_management
    if cfg is not None and cfg.runtime_dir:
        return runtime.default_endpoints(cfg.runtime_dir)[0]
    system = runtime.default_endpoints(config_module.DEFAULT_RUNTIME_DIR)[0]
    if os.path.exists(runtime.ipc_path(system)):
        return system
    return runtime.default_endpoints(runtime.runtime_dir(None, environ))[0]


def request(endpoint, command, params=None, timeout=10.0):
    """Send one request and return the reply dict. Raises Unreachable."""
    path = runtime.ipc_path(endpoint)
    if path is not None:
        if not os.path.exists(path):
            raise Unreachable(f"no daemon: {path} does not exist")
        try:
            if not runtime.ipc_in_use(path):
                raise Unreachable(f"no daemon: nothing is listening on {path}")
        except PermissionError:
            raise Unreachable(f"permission denied on {path} (are you in the backend-mgmt "
                              f"group?)") from None
    context = zmq.Context.instance()
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(endpoint)
        correlation_id = str(uuid.uuid4())
        sock.send(wire.encode_control_request(command, params, correlation_id))
        deadline = time.monotonic() + timeout
        while True:
            remaining_ms = max(0, int((deadline - time.monotonic()) * 1000))
            if not sock.poll(remaining_ms):
                raise Unreachable(f"no reply from {endpoint} within {timeout:g} s")
            reply = wire.decode_control_reply(sock.recv())
            if reply.get("correlation_id") in (correlation_id, None):
                return reply
    finally:
        sock.close(linger=0)
