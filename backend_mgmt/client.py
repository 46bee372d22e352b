"""The client side of the control protocol, for the CLI (and tests, and scripts).

Across a restart, upgrade or crash of the daemon a request is retried within its timeout:
- answered ``shutting_down`` (the daemon did not act on it: it is exiting, or restarting
  with a load in progress): sent again after a moment, to whichever daemon is then there;
- the connection lost before the reply (the daemon died with the request): sent again when
  the command is idempotent (RETRY_ON_LOSS), else the caller is told it is unknown whether
  it was carried out;
- no socket, or nobody listening: waited for while ``coming_back()`` says the daemon is on
  its way (the CLI asks systemd), else Unreachable at once.
"""

import errno
import grp
import os
import pwd
import socket
import time

import zmq

from . import config as config_module, runtime, wire

# Asking again changes nothing: status and the like, and load-model (joins the load in
# progress, or finds the model ready), reload-config (reads the same file).
RETRY_ON_LOSS = frozenset({"status", "list-models", "metrics", "load-model", "reload-config"})
RETRYABLE_CODES = frozenset({"shutting_down"})
NEVER_RETRY = frozenset({"stop-service"})   # "shutting down" is what it asked for
RETRY_PAUSE = 0.1                           # s between attempts
# A monitor event's first frame: event number (u16), value (i32). Parsed here rather than
# with zmq.utils.monitor, which imports asyncio: 20 ms more for every CLI command.


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


class ConnectionLost(Unreachable):
    """The daemon went away after the request was sent; whether it acted is unknown."""


def request(endpoint, command, params=None, timeout=10.0, coming_back=None):
    """Send one request and return the reply dict, retrying across a restart of the daemon
    (see the module doc) until ``timeout`` seconds have passed. Raises Unreachable."""
    deadline = time.monotonic() + timeout
    path = runtime.ipc_path(endpoint)
    reply = None
    while True:
        try:
            if path is not None:
                check_socket(path)
            reply = _attempt(endpoint, command, params, deadline, timeout)
        except PermissionDenied:
            raise
        except ConnectionLost:
            if command not in RETRY_ON_LOSS or time.monotonic() >= deadline:
                raise
        except Unreachable:
            if reply is not None:          # an earlier answer says more than "gone"
                return reply
            if time.monotonic() >= deadline or coming_back is None or not coming_back():
                raise
        else:
            if reply.get("code") not in RETRYABLE_CODES or command in NEVER_RETRY or \
                    time.monotonic() + RETRY_PAUSE >= deadline:
                return reply
        time.sleep(max(0.0, min(RETRY_PAUSE, deadline - time.monotonic())))


def _attempt(endpoint, command, params, deadline, timeout):
    """One request on a fresh connection: the reply, or Unreachable (ConnectionLost when
    the connection broke after the request was sent)."""
    context = zmq.Context.instance()
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED)
    try:
        sock.connect(endpoint)
        import uuid     # here: `serve` loads this module and never sends a request
        correlation_id = str(uuid.uuid4())
        sock.send(wire.encode_control_request(command, params, correlation_id))
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(monitor, zmq.POLLIN)
        connected = False
        while True:
            remaining_ms = max(0, int((deadline - time.monotonic()) * 1000))
            ready = dict(poller.poll(remaining_ms))
            if not ready:
                raise Unreachable(f"no reply from {endpoint} within {timeout:g} s")
            if sock in ready:
                reply = wire.decode_control_reply(sock.recv())
                if reply.get("correlation_id") in (correlation_id, None):
                    return reply
            if monitor in ready:
                event = wire.monitor_event(monitor.recv_multipart()[0])[0]
                if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                    connected = True       # from here on the request is on its way
                elif event == zmq.EVENT_DISCONNECTED and connected and \
                        not sock.poll(0):
                    raise ConnectionLost(f"{endpoint}: the daemon went away before "
                                         f"answering {command}")
    finally:
        sock.disable_monitor()
        monitor.close(linger=0)
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
