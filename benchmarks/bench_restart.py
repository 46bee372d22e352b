#!/usr/bin/python3
"""Restarts, upgrades and crashes of the daemon under load, in a booted systemd container.

    sudo .venv/bin/python -m benchmarks.bench_restart [--deb PATH] [--rounds N] [--clients K]

Builds the .deb from this tree (packaging/build-deb) unless --deb names one, boots it in a
container (tests/system/nspawn.py), loads the default model, then runs one driver inside the
container, so that every time below is on the container's one clock:

- K clients that never retry: each, in a loop, opens a fresh DEALER, sends `status` to the
  control socket and waits up to 10 s for the reply, then the same with a handshake for the
  default model on the handshake socket. A request without a reply in 10 s is lost.
- a loop of `backend-mgmt status --timeout 10` (the CLI); every exit code but 0 is a failure.
- N rounds of: `systemctl restart backend-mgmt`, `dpkg -i` of the same .deb (its postinst
  restarts the service: an upgrade), `kill -9` of the daemon's main process; one event
  every --spacing seconds (6).

It prints, per kind of event: lost requests and CLI failures (counted against the event whose
window they were sent in: from LEAD seconds before the event to LEAD before the next one, so a
request in flight when a kill comes counts against the kill), and the pause: the longest
answer among the requests sent in that window, and the gap: the longest time in it during
which no client (the CLI included) got any answer (what a lost request's 10 s wait hides from
the pause), each as
a distribution over the N events. Figures
only; exit 0. --report FILE prints the figures of a run saved with --json.
Every wait is bounded; the container is powered off and removed at the end.
"""

import argparse
import json
import os
import sys

from tests.system import nspawn

from . import common

DRIVER = r'''
import json, subprocess, sys, threading, time
import zmq
from backend_mgmt.messages import Request

CONTROL = "ipc:///run/backend-mgmt/control.sock"
HANDSHAKE = "ipc:///run/backend-mgmt/handshake.sock"
WAIT = 10.0
rounds, clients, spacing, deb = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
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
        rc = subprocess.run(["backend-mgmt", "status", "--timeout", "10"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            timeout=60).returncode
        cli_runs.append((started, time.monotonic() - started, rc))

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

ACTIONS = {
    "restart": lambda: subprocess.run(["systemctl", "restart", "backend-mgmt"], timeout=120,
                                      capture_output=True),
    "upgrade": lambda: subprocess.run(["dpkg", "-i", deb], timeout=300, capture_output=True,
                                      env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
                                           "DEBIAN_FRONTEND": "noninteractive"}),
    "kill -9": lambda: subprocess.run(["kill", "-9", str(main_pid())], timeout=30),
}

threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
threads.append(threading.Thread(target=cli_loop, daemon=True))
for thread in threads:
    thread.start()
time.sleep(3)
for _ in range(rounds):
    for kind in ("restart", "upgrade", "kill -9"):
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


LEAD = 0.5     # s before an event that already count as its own


def summarize(result):
    events = sorted(result["events"], key=lambda e: e[1])
    bounds = [(kind, start - LEAD, events[i + 1][1] - LEAD if i + 1 < len(events)
               else result["end"]) for i, (kind, start) in enumerate(events)]
    first = events[0][1] - LEAD if events else result["end"]
    calm = [lat for _, sent, lat in result["records"] if sent < first and lat is not None]
    finished = sorted([sent + lat for _, sent, lat in result["records"] if lat is not None] +
                      [started + lat for started, lat, rc in result["cli"] if rc == 0])
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
        runs = [(lat, rc) for started, lat, rc in result["cli"] if start <= started < end]
        entry["cli_runs"] += len(runs)
        entry["cli_failures"] += sum(1 for _, rc in runs if rc != 0)
        entry["cli_longest"] = max([entry["cli_longest"]] + [lat for lat, _ in runs])
    return calm, by_kind


def report(calm, by_kind, rounds, clients):
    print(f"\nrestart benchmark: {rounds} rounds, {clients} never-retrying clients "
          f"(status + handshake, fresh socket each, 10 s timeout) and a CLI loop")
    if calm:
        calm.sort()
        print(f"before the first event: {len(calm)} answers, p50 {calm[len(calm) // 2] * 1000:.1f} "
              f"ms, max {calm[-1] * 1000:.1f} ms")
    print(f"\n{'event':<10}{'n':>3}{'requests':>10}{'lost':>6}{'CLI runs':>10}{'CLI fail':>10}"
          f"{'CLI longest':>13}   pause (longest answer) and gap (no answer at all) per "
          f"event: min / median / max")
    for kind in ("restart", "upgrade", "kill -9"):
        entry = by_kind.get(kind)
        if entry is None:
            continue
        pauses = sorted(p for p in entry["pauses"] if p == p) or [float("nan")]
        print(f"{kind:<10}{entry['events']:>3}{entry['requests']:>10}{entry['lost']:>6}"
              f"{entry['cli_runs']:>10}{entry['cli_failures']:>10}"
              f"{entry['cli_longest']:>11.2f} s   {pauses[0]:.3f} / "
              f"{pauses[len(pauses) // 2]:.3f} / {pauses[-1]:.3f} s; gap "
              f"{min(entry['gaps']):.3f} / {sorted(entry['gaps'])[len(entry['gaps']) // 2]:.3f} / "
              f"{max(entry['gaps']):.3f} s")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--deb", help="the package to test (default: build it from this tree)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--spacing", type=float, default=6.0)
    parser.add_argument("--json", help="also write the raw records to this file")
    parser.add_argument("--report", help="only print the figures of a run saved with --json")
    args = parser.parse_args()
    if args.report:
        with open(args.report) as stream:
            calm, by_kind = summarize(json.load(stream))
        report(calm, by_kind, args.rounds, args.clients)
        return
    problems = nspawn.missing_prerequisites()
    if problems:
        sys.exit("bench_restart: cannot boot a container: " + "; ".join(problems))
    deb = os.path.abspath(args.deb or common.build_deb())
    inside = f"/var/tmp/{os.path.basename(deb)}"
    with nspawn.Container(nspawn.ensure_base_root(), debs=[deb]) as c:
        c.run(["systemctl", "start", "backend-mgmt"], timeout=90)
        nspawn.wait_until(lambda: c.run(["backend-mgmt", "load-model", "demo", "--timeout",
                                         "60"], check=False, timeout=90).returncode == 0,
                          timeout=120, interval=1, what="the demo model to load")
        c.write_file("/var/tmp/bench-driver.py", DRIVER)
        budget = args.rounds * 3 * (args.spacing + 30) + 120
        res = c.run(["python3", "/var/tmp/bench-driver.py", str(args.rounds), str(args.clients),
                     str(args.spacing), inside], timeout=budget, check=False)
        if res.returncode != 0:
            sys.exit(f"the driver failed ({res.returncode}):\n{res.stderr[-4000:]}")
        result = json.loads(res.stdout.strip().splitlines()[-1])
    if args.json:
        with open(args.json, "w") as stream:
            json.dump(result, stream)
    calm, by_kind = summarize(result)
    report(calm, by_kind, args.rounds, args.clients)


if __name__ == "__main__":
    main()
