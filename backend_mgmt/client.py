"""The client side of the control protocol, for the CLI (and tests, and scripts)."""

import errno
import grp
import os
import pwd
import socket
import time
import uuid

import zmq

from . import config as config_module, runtime, wire


class Unreachable(Exception):
    """The daemon is not there (no socket, refused, or no answer in time)."""


class PermissionDenied(Unreachable):
    """The daemon may be there, but this user may not reach its socket."""


def control_endpoint(cfg=None, environ=os.environ):
    """Where the CLI finds the daemon: the config's endpoint, else the runtime dir's socket.

    Without a configured runtime_dir, the system one (/run/backend-mgmt) is used whenever it
    exists (even when this user cannot look inside it: then the error says so), so a user
    never silently talks to a per-user runtime dir while the system daemon runs.
    """
    if environ.get("BACKEND_MGMT_CONTROL"):
        return environ["BACKEND_MGMT_CONTROL"]
    if cfg is not None and cfg.cli_management:
        return cfg.cli_management
    if cfg is not None and cfg.runtime_dir:
        return runtime.default_endpoints(cfg.runtime_dir)[0]
    system = runtime.default_endpoints(config_module.DEFAULT_RUNTIME_DIR)[0]
    if os.geteuid() == 0 or os.path.isdir(config_module.DEFAULT_RUNTIME_DIR):
        return system
    return runtime.default_endpoints(runtime.runtime_dir(None, environ))[0]


def request(endpoint, command, params=None, timeout=10.0):
    """Send one request and return the reply dict. Raises Unreachable."""
    path = runtime.ipc_path(endpoint)
    if path is not None:
        check_socket(path)
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


def check_socket(path):
    """Raise Unreachable saying why ``path`` cannot be used: missing, nobody listening, or
    (PermissionDenied) this user lacks the access that a group gives."""
    try:
        os.stat(path)
    except FileNotFoundError:
        raise Unreachable(f"no daemon: {path} does not exist") from None
    except PermissionError:
        raise PermissionDenied(_permission_message(path)) from None
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EPERM):
            raise PermissionDenied(_permission_message(path)) from None
        if exc.errno in (errno.ECONNREFUSED, errno.ENOENT, errno.ENOTSOCK):
            raise Unreachable(f"no daemon: nothing is listening on {path}") from None
        raise Unreachable(f"cannot connect to {path}: {exc.strerror}") from None
    finally:
        probe.close()


def _permission_message(path):
    """Which group grants access: the socket's, else its directory's (the first one this
    user can see)."""
    group = None
    for candidate in (path, os.path.dirname(path)):
        try:
            group = grp.getgrgid(os.stat(candidate).st_gid).gr_name
            break
        except (OSError, KeyError):
            continue
    try:
        user = pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        user = str(os.geteuid())
    if group is None or group == "root":
        return f"permission denied on {path}: user {user} may not use it"
    return (f"permission denied on {path}: only members of group {group} may use it (an "
            f"administrator can add {user}: usermod -aG {group} {user}; then log in again)")
