#!/usr/bin/python3
"""Restarts, upgrades and crashes of the daemon under load, in a booted systemd container.

    sudo .venv/bin/python -m benchmarks.bench_restart [--deb PATH] [--rounds N] [--clients K]

Builds the .deb from this tree (packaging/build-deb) unless --deb names one, boots it in a
container (tests/system/nspawn.py), loads the default model, then runs the driver of
tests/system/restart_hammer.py inside the container, so that every time below is on the
container's one clock:

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

from . import common

nspawn = common.system_test_module("nspawn")
hammer = common.system_test_module("restart_hammer")


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
            calm, by_kind = hammer.summarize(json.load(stream))
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
        c.write_file("/var/tmp/bench-driver.py", hammer.DRIVER)
        budget = args.rounds * 3 * (args.spacing + 30) + 120
        actions = ["restart", "upgrade", "kill -9"] * args.rounds
        res = c.run(["python3", "/var/tmp/bench-driver.py", str(args.clients),
                     str(args.spacing), inside, *actions], timeout=budget, check=False)
        if res.returncode != 0:
            sys.exit(f"the driver failed ({res.returncode}):\n{res.stderr[-4000:]}")
        result = json.loads(res.stdout.strip().splitlines()[-1])
    if args.json:
        with open(args.json, "w") as stream:
            json.dump(result, stream)
    calm, by_kind = hammer.summarize(result)
    report(calm, by_kind, args.rounds, args.clients)


if __name__ == "__main__":
    main()
