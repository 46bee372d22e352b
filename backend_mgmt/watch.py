"""``backend-mgmt status --watch``: a live view redrawn on each event from the event stream.

It subscribes to the daemon's event socket (as ``backend-mgmt events`` does) and redraws the
status as soon as an event comes (events arriving together give one redraw), and otherwise
every ``interval`` seconds, so that uptimes and usage move on. No polling of the control
socket in between. Ctrl-C ends it (exit 0).
"""

import json
import sys
import time

CLEAR = "\x1b[H\x1b[2J"


def run(get_status, draw, events_endpoint, interval=5.0, count=None, out=None):
    """``get_status()``: the status data or None (daemon unreachable: exit 69 via None);
    ``draw(data)``: print it. Returns the exit code."""
    import zmq
    out = out or sys.stdout
    tty = out.isatty()
    context = zmq.Context()
    sock = context.socket(zmq.SUB)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SUBSCRIBE, b"")
    sock.connect(events_endpoint)
    drawn, why = 0, "start"
    try:
        while count is None or drawn < count:
            data = get_status()
            if data is None:
                return 69
            if tty:
                out.write(CLEAR)
            else:
                out.write(f"-- {time.strftime('%Y-%m-%dT%H:%M:%S')} {why}\n")
            draw(data)
            out.flush()
            drawn += 1
            if count is not None and drawn >= count:
                break
            why = _wait(sock, interval)
    except KeyboardInterrupt:
        pass
    finally:
        sock.close(linger=0)
        context.term()
    return 0


def _wait(sock, interval):
    """Until an event comes (then take every one queued) or ``interval`` passes; why."""
    import zmq
    if not sock.poll(int(interval * 1000)):
        return "refresh"
    seen = []
    while sock.poll(0):
        try:
            event = json.loads(sock.recv(zmq.NOBLOCK))
            seen.append(f"{event.get('model')} {event.get('state')}")
        except (ValueError, zmq.ZMQError):
            break
    return "event: " + ", ".join(seen)
