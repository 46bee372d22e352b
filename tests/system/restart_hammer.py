"""Clients hammering a daemon in a booted container while it is restarted, upgraded or
killed: the driver that runs inside the container, and the figures read from what it prints.
Used by the system test (no request lost) and by benchmarks/bench_restart.py (the figures).

The driver (python3 FILE CLIENTS SPACING DEB ACTION...; an ACTION is "restart", "upgrade":
dpkg -i DEB again, or "kill -9") runs CLIENTS clients that never retry (each, in a loop, a
fresh DEALER with `status` to the control socket, then one with a handshake for the default
model, 10 s for each reply: none is a lost request) and a loop of `backend-mgmt status
--timeout 10`, takes the ACTIONs one every SPACING seconds, and prints one JSON document:
records (kind, sent, latency or None), cli (started, duration, exit code, its last words),
events (kind, started) and end, all on the container's one clock.
"""

DRIVER = r'''
import json, subprocess, sys, threading, time
import zmq
from backend_mgmt.messages import Request

CONTROL = "ipc:///run/backend-mgmt/control.sock"
HANDSHAKE = "ipc:///run/backend-mgmt/handshake.sock"
WAIT = 10.0
clients, spacing, deb, actions = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3], sys.argv[4:]
records, cli_runs, events = [], [], []
stop = threading.Event()
context = zmq.Context()

def once(endpoint, payload):
    # Fresh socket, one request, never a retry: (sent, latency or None).
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    sent = time.monotonic()
    sock.send(payload)
    got = sock.poll(int(WAIT * 1000))
    if got:
        sock.recv()
    sock.close()
    return sent, (time.monotonic() - sent) if got else None

def client():
    status = json.dumps({"command": "status", "params": {}, "correlation_id": "b"}).encode()
    hello = Request(requested_model="demo").SerializeToString()
    while not stop.is_set():
        for kind, endpoint, payload in (("status", CONTROL, status),
                                        ("handshake", HANDSHAKE, hello)):
            sent, latency = once(endpoint, payload)
            records.append((kind, sent, latency))

def cli_loop():
    while not stop.is_set():
        started = time.monotonic()
        res = subprocess.run(["backend-mgmt", "status", "--timeout", "10"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             timeout=60)
        cli_runs.append((started, time.monotonic() - started, res.returncode,
                         res.stderr.strip()[-300:] if res.returncode else ""))

def main_pid():
    out = subprocess.run(["systemctl", "show", "-p", "MainPID", "--value", "backend-mgmt"],
                         capture_output=True, text=True, timeout=30).stdout.strip()
    return int(out or 0)

def wait_active(timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = subprocess.run(["systemctl", "is-active", "backend-mgmt"],
                               capture_output=True, text=True, timeout=30).stdout.strip()
        if state == "active":
            return
        time.sleep(0.1)

ACTIONS = {   # an action that fails ends the run: the figures would not be about it
    "restart": lambda: subprocess.run(["systemctl", "restart", "backend-mgmt"], timeout=120,
                                      capture_output=True, check=True),
    "upgrade": lambda: subprocess.run(["dpkg", "-i", deb], timeout=300, capture_output=True,
                                      check=True,
                                      env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
                                           "DEBIAN_FRONTEND": "noninteractive"}),
    "kill -9": lambda: subprocess.run(["kill", "-9", str(main_pid())], timeout=30, check=True),
}

threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
threads.append(threading.Thread(target=cli_loop, daemon=True))
for thread in threads:
    thread.start()
time.sleep(3)
for kind in actions:
    started = time.monotonic()
    ACTIONS[kind]()
    events.append((kind, started))
    wait_active()
    time.sleep(max(1.0, spacing - (time.monotonic() - started)))
time.sleep(3)
end = time.monotonic()
stop.set()
for thread in threads:
    thread.join(WAIT + 20)
print(json.dumps({"records": records, "cli": cli_runs, "events": events, "end": end}))
'''


# A request sent this many seconds before an event counts against that event (in flight
# when a kill comes).
LEAD = 0.5


def summarize(result):
    events = sorted(result["events"], key=lambda e: e[1])
    bounds = [(kind, start - LEAD, events[i + 1][1] - LEAD if i + 1 < len(events)
               else result["end"]) for i, (kind, start) in enumerate(events)]
    first = events[0][1] - LEAD if events else result["end"]
    calm = [lat for _, sent, lat in result["records"] if sent < first and lat is not None]
    finished = sorted([sent + lat for _, sent, lat in result["records"] if lat is not None] +
                      [started + lat for started, lat, rc, _ in result["cli"] if rc == 0])
    by_kind = {}
    for kind, start, end in bounds:
        entry = by_kind.setdefault(kind, {"events": 0, "lost": 0, "requests": 0,
                                          "cli_failures": 0, "cli_runs": 0, "pauses": [],
                                          "cli_longest": 0.0, "gaps": []})
        entry["events"] += 1
        window = [(sent, lat) for _, sent, lat in result["records"] if start <= sent < end]
        entry["requests"] += len(window)
        entry["lost"] += sum(1 for _, lat in window if lat is None)
        answered = [lat for _, lat in window if lat is not None]
        entry["pauses"].append(max(answered) if answered else float("nan"))
        inside = [start] + [t for t in finished if start <= t < end] + [end]
        entry["gaps"].append(max(b - a for a, b in zip(inside, inside[1:])))
        runs = [(lat, rc) for started, lat, rc, _ in result["cli"] if start <= started < end]
        entry["cli_runs"] += len(runs)
        entry["cli_failures"] += sum(1 for _, rc in runs if rc != 0)
        entry["cli_longest"] = max([entry["cli_longest"]] + [lat for lat, _ in runs])
    return calm, by_kind



def totals(result):
    """Over the whole run: {"lost", "answers", "longest", "cli_failures"}."""
    latencies = [lat for _, _, lat in result["records"]]
    answered = [lat for lat in latencies if lat is not None]
    return {"lost": len(latencies) - len(answered), "answers": len(answered),
            "longest": max(answered, default=None),
            "cli_failures": [words for _, _, rc, words in result["cli"] if rc != 0]}
