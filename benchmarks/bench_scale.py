#!/usr/bin/python3
"""Scale benchmark of the real backend-mgmt daemon with many clients and many real backends.

    .venv/bin/python -m benchmarks.bench_scale [--quick] [--client-procs N]

Starts `python -m backend_mgmt serve` on a temporary config whose models all run the reference
backend (`{python} -m backend_mgmt.reference_backend --startup-delay 0`), drives it over its
control socket and event socket, and prints one table: each figure next to its target, "ok" or
"MISS". It reports numbers only (exit 0 whether or not a target is met). Full mode takes about
2-4 minutes, --quick about a minute.

Figures (full / quick sizes):
 a. 50 concurrent clients x 1000 (quick 200) status requests, each client its own DEALER,
    one request in flight per client, each with a unique correlation_id: lost replies (none
    within 10 s), mismatched replies (not the correlation_id just sent on that socket),
    throughput, p50/p99. Clients are threads of this process by default; --client-procs N
    spreads them over N processes (the table says which, and the client CPU use, so a
    GIL-bound client shows).
 d. crash and restart (restart policy on-failure, backoff_initial = backoff_max = 0.5 s, so
    every restart waits 0.5 s): the backend is SIGKILLed here; kill -> the daemon noticed (the
    "restarting" event's timestamp, and status last_exit.time), noticed -> the new process
    was created (/proc/<pid>/stat starttime, 10 ms clock ticks) vs the 0.5 s backoff.
 c. 100 (quick 30) load-model requests sent at once: the last backend's own process start
    (/proc starttime) -> the last load-model reply.
 b. 200 (quick 50) ready backends: status p50/p99, daemon CPU over 5 s idle, daemon RSS.
 e. reload-config with those models loaded: unchanged file (round trip, and every backend
    keeps its pid), and a file with one model added (validated in a child process).
"""

import argparse
import contextlib
import datetime
import json
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid

import psutil
import zmq

from .common import (MIB, DaemonProcess, Table, Timeout, boottime, dealer, fmt_ms, idle_cpu,
                     ms, now, pct, proc_start_boottime, status_request, subscribe_events,
                     wait_for)

BACKOFF = 0.5
CRASHY = "crashy"

SIZES = {
    # clients, requests per client, ready backends, loads at once, crash rounds, status reqs
    "full": dict(clients=50, requests=1000, ready=200, at_once=100, crashes=5, status=2000,
                 reloads=5),
    "quick": dict(clients=50, requests=200, ready=50, at_once=30, crashes=3, status=500,
                  reloads=3),
}


# --- clocks -----------------------------------------------------------------------------------

def iso_to_epoch(text):
    if not text:
        return None
    return datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(
        tzinfo=datetime.timezone.utc).timestamp()


# --- the daemon under test ----------------------------------------------------------------------

def model_names(count):
    return [f"s{i:03d}" for i in range(count)]


class Daemon(DaemonProcess):
    """The config is JSON (the daemon recognises it by content) so that it can be rewritten
    for the reload figure; models s000.. and the crash model."""

    def __init__(self, tmp, models):
        self.models = models
        self.extra = []
        super().__init__(tmp)

    def document(self):
        reference = ["{python}", "-m", "backend_mgmt.reference_backend", "--startup-delay", "0"]
        return {
            "runtime_dir": self.run_dir,
            "model_backends": {
                "ref": {"command": reference, "startup_timeout": 60, "stop_timeout": 5},
            },
            "supported_models": (
                [{"name": name, "type": "ref"} for name in self.models + self.extra] +
                [{"name": CRASHY, "type": "ref",
                  "restart": {"policy": "on-failure", "backoff_initial": BACKOFF,
                              "backoff_max": BACKOFF, "max_restarts": 100, "window": 300}}]),
        }

    def _write_config(self):
        temporary = self.config_path + ".new"
        with open(temporary, "w", encoding="utf-8") as stream:
            json.dump(self.document(), stream, indent=1)
        os.replace(temporary, self.config_path)

    def add_model(self, name):
        self.extra.append(name)
        self._write_config()

    def status(self, timeout=10.0):
        reply, _, _ = self.control.call("status", timeout=timeout)
        if not reply.get("success"):
            raise RuntimeError(f"status failed: {reply}")
        return reply["data"]

    def models_by_name(self):
        return {m["name"]: m for m in self.status()["models"]}

    def load_many(self, names, timeout):
        """Send every load at once; {name: (reply, received monotonic)}."""
        cids = [(self.control.send("load-model", name)[0], name) for name in names]
        replies = self.control.wait([cid for cid, _ in cids], timeout)
        return {name: replies[cid] for cid, name in cids}

    def unload_many(self, names, timeout=60.0):
        cids = [self.control.send("unload-model", name)[0] for name in names]
        return self.control.wait(cids, timeout)


# --- a. many concurrent clients ----------------------------------------------------------------

def _client(context, endpoint, client_id, requests, timeout, barrier, out):
    """One DEALER, one request in flight: send status with a unique correlation_id, wait up
    to ``timeout`` for its reply. Appends a result dict to ``out``."""
    sock = dealer(context, endpoint)
    result = {"latencies": [], "lost": 0, "mismatched": 0, "bad": 0, "errors": []}
    try:
        # Connect and warm up outside the measurement.
        sock.send(status_request(f"warm-{client_id}"))
        if sock.poll(int(timeout * 1000)):
            sock.recv()
        barrier.wait(60)
        prefix = f"{client_id}-{uuid.uuid4().hex[:8]}-"
        latencies = result["latencies"]
        clock = time.perf_counter
        for i in range(requests):
            cid = prefix + str(i)
            payload = ('{"command": "status", "params": {}, "correlation_id": "%s"}'
                       % cid).encode()
            start = clock()
            sock.send(payload)
            if not sock.poll(int(timeout * 1000)):
                result["lost"] += 1
                continue
            frames = sock.recv_multipart()
            latencies.append(clock() - start)
            try:
                reply = json.loads(frames[-1])
            except ValueError:
                result["bad"] += 1
                continue
            if len(frames) != 1 or reply.get("correlation_id") != cid:
                result["mismatched"] += 1
            elif not reply.get("success"):
                result["bad"] += 1
    except Exception as exc:     # reported, not raised
        result["errors"].append(repr(exc))
    finally:
        sock.close(linger=0)
        out.append(result)


def _client_process(endpoint, client_ids, requests, timeout, barrier, queue):
    """A process running some of the clients as threads (--client-procs)."""
    context = zmq.Context()
    out = []
    threads = [threading.Thread(target=_client, daemon=True,
                                args=(context, endpoint, cid, requests, timeout, barrier, out))
               for cid in client_ids]
    before = sum(os.times()[:2])
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout * requests + 120)
    cpu = sum(os.times()[:2]) - before
    context.destroy(linger=0)
    queue.put({"results": out, "cpu": cpu})


def fig_a_clients(context, daemon, clients, requests, procs, timeout=10.0):
    daemon_cpu_before = sum(daemon.ps.cpu_times()[:2])
    results = []
    if procs <= 1:
        barrier = threading.Barrier(clients + 1)
        own_before = sum(os.times()[:2])
        threads = [threading.Thread(target=_client, daemon=True,
                                    args=(context, daemon.control_endpoint, f"c{i}", requests,
                                          timeout, barrier, results))
                   for i in range(clients)]
        for thread in threads:
            thread.start()
        barrier.wait(60)
        daemon_cpu_before = sum(daemon.ps.cpu_times()[:2])
        start = now()
        for thread in threads:
            thread.join(timeout * requests + 120)
        elapsed = now() - start
        client_cpu = sum(os.times()[:2]) - own_before
        mode = f"{clients} threads in one process"
    else:
        mp = multiprocessing.get_context("spawn")
        barrier = mp.Barrier(clients + 1)
        queue = mp.Queue()
        groups = [[f"c{i}" for i in range(clients) if i % procs == p] for p in range(procs)]
        workers = [mp.Process(target=_client_process, daemon=True,
                              args=(daemon.control_endpoint, group, requests, timeout,
                                    barrier, queue)) for group in groups]
        try:
            for worker in workers:
                worker.start()
            barrier.wait(120)
            daemon_cpu_before = sum(daemon.ps.cpu_times()[:2])
            start = now()
            client_cpu = 0.0
            for _ in workers:
                got = queue.get(timeout=timeout * requests + 120)
                results += got["results"]
                client_cpu += got["cpu"]
            elapsed = now() - start
        finally:
            for worker in workers:
                worker.join(5)
                if worker.is_alive():
                    worker.kill()
        mode = f"{clients} clients as threads in {procs} processes"
    daemon_cpu = sum(daemon.ps.cpu_times()[:2]) - daemon_cpu_before
    latencies = [lat for r in results for lat in r["latencies"]]
    return {
        "mode": mode, "clients_done": len(results),
        "sent": clients * requests, "answered": len(latencies),
        "lost": sum(r["lost"] for r in results) + (clients - len(results)) * requests,
        "mismatched": sum(r["mismatched"] for r in results),
        "bad": sum(r["bad"] for r in results),
        "errors": [e for r in results for e in r["errors"]],
        "elapsed": elapsed, "throughput": len(latencies) / elapsed if elapsed else 0.0,
        "latencies": latencies, "daemon_cpu": daemon_cpu, "client_cpu": client_cpu,
    }


# --- d. crash detection and restart ------------------------------------------------------------

class Events:
    """A SUB socket on the daemon's event stream."""

    def __init__(self, context, endpoint):
        self.sock = subscribe_events(context, endpoint)

    def next(self, model, states, timeout):
        """The next event of ``model`` whose state is in ``states``; None after timeout."""
        deadline = now() + timeout
        while True:
            left = deadline - now()
            if left <= 0 or not self.sock.poll(max(1, int(left * 1000))):
                return None
            event = json.loads(self.sock.recv())
            if event.get("model") == model and event.get("state") in states:
                return event

    def drain(self):
        while self.sock.poll(0):
            self.sock.recv()

    def close(self):
        self.sock.close(linger=0)


def wait_model(daemon, name, predicate, timeout, interval=0.01):
    def check():
        model = daemon.models_by_name().get(name)
        return model if model is not None and predicate(model) else None
    found = wait_for(check, timeout, interval)
    if not found:
        raise RuntimeError(f"{name}: condition not reached in {timeout} s: "
                           f"{daemon.models_by_name().get(name)}")
    return found


def fig_d_crashes(context, daemon, rounds):
    events = Events(context, daemon.events_endpoint)
    out = {"notice_ev": [], "notice_status": [], "timer": [], "spawn": [], "ready": [],
           "next_restart": [], "restarts": [], "problems": []}
    try:
        reply, _, _ = daemon.control.call("load-model", CRASHY, timeout=30.0)
        if not reply.get("success"):
            raise RuntimeError(f"load-model {CRASHY} failed: {reply}")
        time.sleep(0.3)                 # the SUB connection is up (slow joiner)
        for rnd in range(rounds):
            model = wait_model(daemon, CRASHY, lambda m: m["state"] == "ready" and m["pid"],
                               15.0)
            old_pid = model["pid"]
            time.sleep(0.2)
            events.drain()
            kill_wall, kill_boot = time.time(), boottime()
            os.kill(old_pid, signal.SIGKILL)
            noticed = events.next(CRASHY, {"restarting", "failed"}, 5.0)
            if noticed is None or noticed["state"] != "restarting":
                out["problems"].append(f"round {rnd}: no restarting event: {noticed}")
                continue
            fired = events.next(CRASHY, {"loading"}, 5.0)
            ready = events.next(CRASHY, {"ready", "failed", "restarting"}, 15.0)
            model = wait_model(daemon, CRASHY,
                               lambda m, old=old_pid: m["state"] == "ready" and m["pid"] != old,
                               15.0)
            new_pid = model["pid"]
            try:
                spawn_boot = proc_start_boottime(new_pid)
            except OSError:
                out["problems"].append(f"round {rnd}: new pid {new_pid} gone")
                continue
            notice = noticed["timestamp"] - kill_wall
            out["notice_ev"].append(notice)
            exit_time = iso_to_epoch((model.get("last_exit") or {}).get("time"))
            if exit_time is not None:
                out["notice_status"].append(exit_time - kill_wall)
            out["spawn"].append((spawn_boot - kill_boot) - notice)
            if fired is not None:
                out["timer"].append(fired["timestamp"] - noticed["timestamp"])
                if ready is not None and ready["state"] == "ready":
                    out["ready"].append(ready["timestamp"] - fired["timestamp"])
            # next_restart_at is only in status while restarting; the event reason says it
            # too ("restarting in 0.5 s").
            out["next_restart"].append(noticed.get("reason", ""))
            out["restarts"].append(model["restarts"])
        daemon.control.call("unload-model", CRASHY, timeout=30.0)
    finally:
        events.close()
    return out


# --- c. many loads at once ---------------------------------------------------------------------

def fig_c_at_once(daemon, names):
    offset = boottime() - now()               # monotonic -> boottime
    start = now()
    replies = daemon.load_many(names, timeout=120.0)
    failures = [(n, r) for n, (r, _) in replies.items() if not r.get("success")]
    last_reply = max(received for _, received in replies.values())
    starts = {}
    for name, (reply, _) in replies.items():
        pid = ((reply.get("data") or {}).get("model") or {}).get("pid")
        if pid:
            with contextlib.suppress(OSError):
                starts[name] = proc_start_boottime(pid) - offset    # -> monotonic
    last_start = max(starts.values()) if starts else float("nan")
    first_start = min(starts.values()) if starts else float("nan")
    return {"count": len(names), "failures": failures, "wall": last_reply - start,
            "last_start_to_last_reply": last_reply - last_start,
            "spawn_spread": last_start - first_start, "first_start": first_start - start,
            "starts_seen": len(starts)}


# --- b. many ready backends --------------------------------------------------------------------

def sequential_status(context, endpoint, count, warmup=100):
    sock = dealer(context, endpoint)
    times, size = [], 0
    try:
        for i in range(warmup + count):
            cid = uuid.uuid4().hex
            payload = ('{"command": "status", "params": {}, "correlation_id": "%s"}'
                       % cid).encode()
            start = time.perf_counter()
            sock.send(payload)
            if not sock.poll(10000):
                raise Timeout("status: no reply in 10 s")
            reply = sock.recv()
            elapsed = time.perf_counter() - start
            if i >= warmup:
                times.append(elapsed)
        size = len(reply)
        if json.loads(reply).get("correlation_id") != cid:
            raise RuntimeError("status reply with the wrong correlation_id")
    finally:
        sock.close(linger=0)
    return times, size


def load_in_batches(daemon, names, batch=20):
    failures = []
    start = now()
    for i in range(0, len(names), batch):
        replies = daemon.load_many(names[i:i + batch], timeout=120.0)
        failures += [(n, r) for n, (r, _) in replies.items() if not r.get("success")]
    return now() - start, failures


# --- e. reload-config ----------------------------------------------------------------------------

def ready_pids(daemon):
    return {m["name"]: m["pid"] for m in daemon.status()["models"] if m["state"] == "ready"}


def fig_e_reload(daemon, rounds):
    before = ready_pids(daemon)
    unchanged, replies = [], []
    for _ in range(rounds):
        reply, sent, received = daemon.control.call("reload-config", timeout=60.0)
        unchanged.append(received - sent)
        replies.append(reply)
    after = ready_pids(daemon)
    daemon.add_model("added0")
    reply_changed, sent, received = daemon.control.call("reload-config", timeout=60.0)
    changed = received - sent
    after_changed = ready_pids(daemon)
    # Once more unchanged, now that the daemon holds the new file's bytes.
    reply_again, sent, received = daemon.control.call("reload-config", timeout=60.0)
    unchanged_after = received - sent
    return {
        "unchanged": unchanged, "unchanged_ok": all(r.get("success") for r in replies),
        "unchanged_changed": [r.get("data", {}).get("changed") for r in replies],
        "pids_kept": before == after, "ready_before": len(before), "ready_after": len(after),
        "changed": changed, "changed_reply": reply_changed,
        "pids_kept_changed": before == after_changed,
        "unchanged_after": unchanged_after, "again_ok": reply_again.get("success"),
    }


# --- main ----------------------------------------------------------------------------------------

def leftover_backends(run_dir):
    """Reference backends whose endpoint is in our runtime dir (there should be none)."""
    found = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        cmdline = process.info.get("cmdline") or []
        if any(run_dir in part for part in cmdline) and \
                "backend_mgmt.reference_backend" in cmdline:
            found.append(process)
    return found


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes, < 90 s")
    parser.add_argument("--client-procs", type=int, default=1, metavar="N",
                        help="run figure a's clients in N processes (default 1: threads)")
    args = parser.parse_args(argv)
    size = SIZES["quick" if args.quick else "full"]
    began = now()

    tmp = tempfile.mkdtemp(prefix="bs-", dir="/tmp")
    context = zmq.Context()
    daemon = Daemon(tmp, model_names(size["ready"]))
    table = Table()
    leftovers, sigkills = [], None
    try:
        daemon.start(context)
        time.sleep(0.3)
        rss0 = daemon.ps.memory_info().rss
        print(f"daemon pid {daemon.process.pid}, runtime dir {daemon.run_dir}, "
              f"{'quick' if args.quick else 'full'} mode", flush=True)

        t = table
        print(f"a. {size['clients']} clients x {size['requests']} status ...", flush=True)
        a = fig_a_clients(context, daemon, size["clients"], size["requests"], args.client_procs)
        t.section(f"a. {size['clients']} concurrent clients x {size['requests']} status "
                  f"({a['mode']}, one request in flight each)")
        t.row("replies received", f"{a['answered']} / {a['sent']}", "all",
              a["answered"] == a["sent"])
        t.row("lost (no reply within 10 s)", str(a["lost"]), "0", a["lost"] == 0)
        t.row("mismatched correlation_id", str(a["mismatched"]), "0", a["mismatched"] == 0)
        t.row("error replies / unparsable", str(a["bad"]), "0", a["bad"] == 0)
        t.row("throughput", f"{a['throughput']:8.0f} /s", "(info)")
        t.row("latency p50", fmt_ms(pct(a["latencies"], 50)), "(info)")
        t.row("latency p99", fmt_ms(pct(a["latencies"], 99)), "(info)")
        t.row("latency max", fmt_ms(max(a["latencies"]) if a["latencies"] else float("nan")),
              "(info)")
        t.row("daemon CPU per request",
              f"{a['daemon_cpu'] / max(1, a['answered']) * 1e6:8.1f} us", "(info)")
        t.note(f"(wall {a['elapsed']:.1f} s; daemon CPU {a['daemon_cpu']:.1f} s = "
               f"{100 * a['daemon_cpu'] / a['elapsed']:.0f} % of one core; clients' CPU "
               f"{a['client_cpu']:.1f} s = {100 * a['client_cpu'] / a['elapsed']:.0f} % of "
               f"one core; {os.cpu_count()} cores)")
        for err in a["errors"][:3]:
            t.note(f"client error: {err}")

        print(f"d. crash and restart x {size['crashes']} ...", flush=True)
        d = fig_d_crashes(context, daemon, size["crashes"])
        t.section(f"d. SIGKILL of a ready backend, restart on-failure after {BACKOFF:g} s "
                  f"({len(d['notice_ev'])} rounds)")
        n = d["notice_ev"]
        t.row("kill -> noticed, max (event timestamp)",
              fmt_ms(max(n) if n else float("nan")), "< 100 ms", bool(n) and max(n) < 0.100)
        t.row("kill -> noticed, p50 (event timestamp)", fmt_ms(pct(n, 50)), "(info)")
        ns = d["notice_status"]
        t.row("kill -> status last_exit.time, max (ms res.)",
              fmt_ms(max(ns) if ns else float("nan")), "< 100 ms",
              bool(ns) and max(ns) < 0.100)
        sp = d["spawn"]
        worst = max(sp, key=lambda x: abs(x - BACKOFF)) if sp else float("nan")
        t.row("noticed -> new process created, worst",
              fmt_ms(worst), f"{BACKOFF * 1000:.0f} +- 50 ms",
              bool(sp) and all(abs(x - BACKOFF) <= 0.050 for x in sp))
        t.note("(each round: " + ", ".join(f"{ms(x):.0f}" for x in sp) +
               " ms; /proc starttime has 10 ms ticks)")
        tm = d["timer"]
        t.row("noticed -> restart timer fired (events), max",
              fmt_ms(max(tm) if tm else float("nan")), "(info)")
        rd = d["ready"]
        t.row("restart fired -> ready again, p50", fmt_ms(pct(rd, 50)), "(info)")
        t.row("restarts counted", ", ".join(map(str, d["restarts"])) or "-",
              "1..n", d["restarts"] == list(range(1, len(d["restarts"]) + 1)))
        if d["next_restart"]:
            t.note(f"(reason: {d['next_restart'][-1]})")
        for problem in d["problems"][:3]:
            t.note(f"problem: {problem}")

        names = model_names(size["ready"])
        at_once = names[:size["at_once"]]
        print(f"c. {len(at_once)} loads at once ...", flush=True)
        c = fig_c_at_once(daemon, at_once)
        t.section(f"c. {c['count']} load-model requests sent at once")
        t.row("last backend's start -> last reply", fmt_ms(c["last_start_to_last_reply"]),
              "< 5000 ms", c["last_start_to_last_reply"] < 5.0 and not c["failures"])
        t.row("send -> last reply", fmt_ms(c["wall"]), "(info)")
        t.row("first start -> last start (spawning)", fmt_ms(c["spawn_spread"]), "(info)")
        t.row("send -> first backend start (10 ms ticks)", fmt_ms(c["first_start"]),
              "(info)")
        t.row("load failures", str(len(c["failures"])), "0", not c["failures"])
        for name, reply in c["failures"][:3]:
            t.note(f"{name}: {reply.get('code')}: {reply.get('error')}")

        rest = names[size["at_once"]:]
        print(f"b. loading {len(rest)} more in batches of 20 ...", flush=True)
        batch_wall, batch_failures = load_in_batches(daemon, rest)
        time.sleep(0.5)
        status_now = daemon.status()
        ready_count = sum(1 for m in status_now["models"] if m["state"] == "ready")
        print(f"b. status, idle CPU, RSS with {ready_count} ready ...", flush=True)
        status_times, status_size = sequential_status(context, daemon.control_endpoint,
                                                      size["status"])
        time.sleep(0.5)
        cpu_used, cpu_pct = idle_cpu(daemon.ps, 5.0)
        rss = daemon.ps.memory_info().rss
        fds = daemon.ps.num_fds()
        t.section(f"b. {size['ready']} ready backends")
        t.row("ready backends", f"{ready_count} / {size['ready']}", "all",
              ready_count == size["ready"])
        t.row(f"loading the other {len(rest)} in batches of 20", fmt_ms(batch_wall),
              f"(info; {len(batch_failures)} failed)", not batch_failures)
        t.row(f"status p50 ({len(status_times)} sequential)", fmt_ms(pct(status_times, 50)),
              "(info)")
        t.row("status p99", fmt_ms(pct(status_times, 99)), "< 2 ms",
              pct(status_times, 99) < 0.002)
        t.row("status reply size", f"{status_size / 1024:8.1f} KiB", "(info)")
        t.row("daemon idle CPU over 5 s", f"{cpu_pct:8.2f} %", "0.0 %", cpu_used == 0.0)
        t.note(f"(cpu time used: {cpu_used * 1000:.1f} ms; clock tick is 10 ms)")
        t.row("daemon RSS", f"{rss / MIB:8.1f} MiB", "< 50 MiB", rss < 50 * MIB)
        t.row("daemon RSS, fresh (0 models)", f"{rss0 / MIB:8.1f} MiB", "(info)")
        t.row("daemon open fds", f"{fds:8d}", "(info)")

        print("e. reload-config ...", flush=True)
        e = fig_e_reload(daemon, size["reloads"])
        t.section(f"e. reload-config with {e['ready_before']} models loaded")
        u = e["unchanged"]
        t.row(f"unchanged file: round trip max ({len(u)})",
              fmt_ms(max(u)), "< 200 ms", max(u) < 0.200 and e["unchanged_ok"])
        t.row("unchanged file: round trip p50", fmt_ms(pct(u, 50)), "(info)")
        t.row("unchanged file: every backend kept its pid", str(e["pids_kept"]), "True",
              e["pids_kept"])
        t.row("one model added: round trip", fmt_ms(e["changed"]),
              "(info; validated in a child)")
        cr = e["changed_reply"]
        t.row("one model added: reply", "ok" if cr.get("success") else str(cr.get("code")),
              "ok", bool(cr.get("success")))
        t.note(f"(added: {(cr.get('data') or {}).get('added')})")
        t.row("one model added: every backend kept its pid", str(e["pids_kept_changed"]),
              "True", e["pids_kept_changed"])
        t.row("unchanged again after that", fmt_ms(e["unchanged_after"]), "< 200 ms",
              e["unchanged_after"] < 0.200 and e["again_ok"])
        rss_end = daemon.ps.memory_info().rss
        t.row("daemon RSS at the end", f"{rss_end / MIB:8.1f} MiB", "(info)")
    except Exception as exc:
        print(f"\nbenchmark aborted: {exc!r}", file=sys.stderr)
        print("daemon log tail:\n" + daemon.log_tail(), file=sys.stderr)
    finally:
        stop_began = now()
        daemon.stop(wait=60.0)
        stop_time = now() - stop_began
        wait_for(lambda: not leftover_backends(daemon.run_dir), 10.0, 0.1)
        leftovers = leftover_backends(daemon.run_dir)
        try:
            with open(daemon.log_path, encoding="utf-8", errors="replace") as stream:
                sigkills = sum(1 for line in stream if "after SIGTERM; sending SIGKILL" in line)
        except OSError:
            sigkills = None
        for process in leftovers:
            with contextlib.suppress(psutil.Error):
                process.kill()
        context.destroy(linger=0)
        shutil.rmtree(tmp, ignore_errors=True)
    if table.rows:
        table.section("cleanup")
        table.row("stop-service -> daemon gone", fmt_ms(stop_time), "(info)")
        table.row("backends SIGKILLed after stop_timeout (5 s)", str(sigkills), "(info)")
        table.row("backends left running", str(len(leftovers)), "0", not leftovers)
        table.print()
    print(f"\ntotal time: {now() - began:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
