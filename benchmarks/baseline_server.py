"""A minimal control server, the yardstick for the daemon's status round trip.

    python3 benchmarks/baseline_server.py ENDPOINT TEMPLATE_JSON_FILE

A ROUTER socket that answers every request with what the daemon's status answers (the status
data in TEMPLATE_JSON_FILE, with the time-dependent fields refreshed): recv_multipart,
json.loads, json.dumps, send_multipart, and nothing else. SIGTERM stops it.
"""

import json
import signal
import sys
import time

import zmq


def main(endpoint, template_path):
    with open(template_path, encoding="utf-8") as stream:
        template = json.load(stream)
    started = time.monotonic()
    context = zmq.Context()
    sock = context.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(endpoint)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        while True:
            frames = sock.recv_multipart()
            request = json.loads(frames[-1])
            data = dict(template)
            data["uptime"] = round(time.monotonic() - started, 3)
            reply = {"correlation_id": request.get("correlation_id"), "success": True,
                     "data": data}
            sock.send_multipart([*frames[:-1],
                                 json.dumps(reply, separators=(",", ":")).encode("utf-8")])
    finally:
        sock.close(linger=0)
        context.term()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
