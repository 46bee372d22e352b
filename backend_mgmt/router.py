"""Reading and answering on the daemon's listening ROUTER sockets, at the least cost per message.

pyzmq's conveniences cost more than the rest of a status request: recv_multipart and
send_multipart ask RCVMORE and build flags with IntFlag enum arithmetic per frame, and every
flag test on a pyzmq constant does the same. Here the constants are plain ints, a message is
read frame by frame (the last as a zmq.Frame: it knows who sent it, see peers.py), and a reply
is sent frame by frame through the compiled send underneath zmq.Socket.send, whose Python
wrapper (options for other socket types) costs as much again per frame.
"""

import logging

import zmq
from zmq.backend import Socket as CompiledSocket

log = logging.getLogger(__name__)

MAX_MESSAGES_PER_WAKE = 64     # then let other sockets and timers have a turn
EVENTS = int(zmq.EVENTS)
POLLIN = int(zmq.POLLIN)
NOBLOCK = int(zmq.NOBLOCK)
SNDMORE = int(zmq.SNDMORE)
send_frame = CompiledSocket.send      # (socket, bytes, flags): what zmq.Socket.send ends in


def drain(sock, handle, heard=None):
    """Call ``handle(frames, last_frame)`` for each message queued on ``sock``, up to a fair
    share per wake-up, and ``heard(last_frame)`` after it if given (bookkeeping: the reply
    does not wait for it). Called when the poll found ``sock`` readable, so the first
    message is read without asking; EVENTS is asked after each one (a system call, but
    cheaper than the zmq.Again exception a read of an empty socket raises). A socket closed
    by a handler ends it."""
    if sock.closed:
        return
    for _ in range(MAX_MESSAGES_PER_WAKE):
        try:
            frames, last = receive(sock)
        except zmq.Again:                 # nothing after all (read by a handler meanwhile)
            return
        handle(frames, last)
        if heard is not None:
            heard(last)
        if sock.closed or not sock.getsockopt(EVENTS) & POLLIN:
            return


def receive(sock):
    """One whole message from a ROUTER: its frames as bytes, and its last frame as a
    zmq.Frame. A ROUTER puts the sender's identity first, always followed by what it sent."""
    frames = [sock.recv(NOBLOCK)]
    while True:
        frame = sock.recv(NOBLOCK, copy=False)
        frames.append(frame.bytes)
        if not frame.more:
            return frames, frame


def send(sock, frames):
    """Send a reply's frames without blocking; raises zmq.ZMQError as send_multipart would."""
    last = len(frames) - 1
    for index, frame in enumerate(frames):
        send_frame(sock, frame, NOBLOCK | SNDMORE if index < last else NOBLOCK)


def reply(sock, frames, what="reply"):
    """Send a reply if it still can be: not after the socket closed (a late answer after
    shutdown), and never blocking (a peer gone, or its queue full: the reply is dropped and
    logged at debug level as ``what``)."""
    if sock.closed:
        return
    try:
        send(sock, frames)
    except zmq.ZMQError as exc:
        log.debug("%s dropped: %s", what, exc)
