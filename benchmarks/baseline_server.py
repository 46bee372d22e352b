"""The floor for the daemon's status round trip: a minimal ROUTER in its own process.

    python3 benchmarks/baseline_server.py ENDPOINT REPLY_FILE

Answers every request with the bytes in REPLY_FILE (the daemon's own status reply to the
same request, so both send the same bytes): recv_multipart, send_multipart, nothing else.
What the daemon takes beyond this is the cost of its control path. SIGTERM stops it.
"""

import signal
import sys

import zmq


def main(endpoint, reply_path):
    with open(reply_path, "rb") as stream:
        reply = stream.read()
    context = zmq.Context()
    sock = context.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(endpoint)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        while True:
            frames = sock.recv_multipart()
            sock.send_multipart([*frames[:-1], reply])
    finally:
        sock.close(linger=0)
        context.term()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
