#!/usr/bin/python3
"""Benchmark the real backend-mgmt daemon with real reference backends.

    python3 -m benchmarks.bench_daemon [--quick] [--rtt-only]

Starts `python3 -m backend_mgmt serve` on a temporary config, drives it over its control
socket like the CLI does, and prints one table: each figure next to its target. It reports
numbers only (it exits 0 whether or not a target is met; "MISS" marks the ones that are not).

Backends are benchmarks/timed_backend.py: the reference backend (startup delay 0.1 s) plus a
file of CLOCK_MONOTONIC timestamps of the moment it bound its socket and the moment it exited,
so the daemon's reaction times are measured from the backend's own readiness / exit.

Figures:
 1. load-model reply after the backend bound (p50/max over N loads), and a handshake to the
    returned endpoint right after the reply
 2. status latency while 5 loads (2 s startup) are in flight
 3. 10 loads at once vs one load, vs launching the same 10 backends directly
 4. crash at start (exit code 3): backend exit -> failed reply
 5. status round trip with 10 models loaded, a fresh DEALER per request, against the floor: a
    minimal ROUTER in its own process answering with the daemon's own reply bytes
    (baseline_server.py), measured in alternated rounds; also one socket sequential and
    8 threads
 6. idle CPU with 10 backends loaded, daemon RSS with 0 and 10 models
"""

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid

import psutil
import zmq

from backend_mgmt.messages import Request, Response

from .common import (HERE, MIB, TIMED_BACKEND, Control, DaemonProcess, Table, clean_env, fmt_ms,
                     idle_cpu, kill_group, ms, now, pct, read_times, result_us, wait_for)

PYTHON = "/usr/bin/python3"
BASELINE_SERVER = os.path.join(HERE, "baseline_server.py")
N_FAST = 10           # models m0..m9 (startup delay 0.1 s)
N_SLOW = 5            # models s0..s4 (startup delay 2 s)


# --- the daemon under test -------------------------------------------------------------------

class Daemon(DaemonProcess):
    def __init__(self, tmp):
        super().__init__(tmp, python=PYTHON)

    def _write_config(self):
        fast = [PYTHON, TIMED_BACKEND, "--startup-delay", "0.1"]
        slow = [PYTHON, TIMED_BACKEND, "--startup-delay", "2"]
        lines = [f"runtime_dir: {self.run_dir}",
                 "model_backends:",
                 f"  fast: {{command: {json.dumps(fast)}, stop_timeout: 3}}",
                 f"  slow: {{command: {json.dumps(slow)}, stop_timeout: 3}}",
                 "supported_models:"]
        models = [(f"m{i}", "fast", []) for i in range(N_FAST)]
        models += [(f"s{i}", "slow", []) for i in range(N_SLOW)]
        models += [("crash", "fast", ["--fail-at-start", "3"])]
        for name, kind, args in models:
            env = json.dumps({"BENCH_TIMES_FILE": self.times_file(name)})
            lines.append(f"  - {{name: {name}, type: {kind}, args: {json.dumps(args)}, "
                         f"env: {env}}}")
        with open(self.config_path, "w", encoding="utf-8") as stream:
            stream.write("\n".join(lines) + "\n")


# --- the figures ------------------------------------------------------------------------------

def load_ok(reply):
    return reply.get("success") is True


def unload_all(daemon, models, timeout=15.0):
    cids = [daemon.control.send("unload-model", m)[0] for m in models]
    daemon.control.wait(cids, timeout)


def handshake_rtt(context, endpoint, model, timeout=2.0):
    """Connect a DEALER to a backend endpoint, send a handshake, time to its Response."""
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        start = now()
        sock.connect(endpoint)
        sock.send(Request(requested_model=model).SerializeToString())
        if not sock.poll(int(timeout * 1000)):
            return None, "no answer"
        response = Response.FromString(sock.recv())
        return now() - start, (response.error_message or ",".join(response.protocols))
    finally:
        sock.close(linger=0)


def fig1_load_vs_ready(context, daemon, rounds):
    after_ready, walls, hs_times, hs_fail = [], [], [], []
    for _ in range(rounds):
        path = daemon.times_file("m0")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        reply, sent, received = daemon.control.call("load-model", "m0", timeout=15.0)
        if not load_ok(reply):
            raise RuntimeError(f"load-model m0 failed: {reply}")
        rtt, answer = handshake_rtt(context, reply["data"]["endpoint"], "m0")
        if rtt is None or answer != "ping":
            hs_fail.append(answer)
        else:
            hs_times.append(rtt)
        listening = read_times(path).get("listening")
        if listening:
            after_ready.append(received - listening[-1])
        walls.append(received - sent)
        unload_reply, _, _ = daemon.control.call("unload-model", "m0", timeout=15.0)
        if not load_ok(unload_reply):
            raise RuntimeError(f"unload-model m0 failed: {unload_reply}")
    return {"after_ready": after_ready, "wall": walls, "handshake": hs_times,
            "handshake_failures": hs_fail}


def fig2_status_during_loads(daemon, control_status, quick):
    began = now()
    loads = [daemon.control.send("load-model", f"s{i}")[0] for i in range(N_SLOW)]
    latencies, offsets, first = [], [], None
    deadline = now() + 15.0
    pending = set(loads)
    while pending and now() < deadline:
        cid, sent = control_status.send("status")
        control_status.wait([cid], 5.0)
        latencies.append(now() - sent)
        offsets.append(sent - began)
        if first is None:
            first = latencies[0]
        while daemon.control.poll_once(0):
            pass
        pending = {c for c in loads if c not in daemon.control.replies}
    replies = daemon.control.wait(loads, 10.0)
    ok = sum(1 for reply, _ in replies.values() if load_ok(reply))
    unload_all(daemon, [f"s{i}" for i in range(N_SLOW)])
    worst = sorted(zip(latencies, offsets), reverse=True)[:5]
    return {"status": latencies, "first": first, "loads_ok": ok, "worst": worst}


def launch_direct(tmp, count, tag):
    """Start ``count`` timed backends ourselves (no daemon); time until the last has bound."""
    directory = os.path.join(tmp, f"direct-{tag}")
    os.makedirs(directory)
    env = clean_env()
    env["PYTHONUNBUFFERED"] = "1"
    processes, files = [], []
    start = now()
    try:
        for i in range(count):
            files.append(os.path.join(directory, f"d{i}.times"))
            env_i = dict(env, BENCH_TIMES_FILE=files[-1])
            processes.append(subprocess.Popen(
                [PYTHON, TIMED_BACKEND, "--startup-delay", "0.1",
                 "--ipc-endpoint", "ipc://" + os.path.join(directory, f"d{i}.sock"),
                 "--model-name", f"d{i}"],
                env=env_i, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL, start_new_session=True))
        spawned = now() - start

        def all_listening():
            found = [read_times(f).get("listening") for f in files]
            return found if all(found) else None
        found = wait_for(all_listening, 20.0, interval=0.001)
        if not found:
            raise RuntimeError(f"direct launch of {count} backends: not all bound in 20 s")
        return max(t[-1] for t in found) - start, spawned
    finally:
        for process in processes:
            kill_group(process, grace=2.0)


def fig3_ten_at_once(tmp, daemon, rounds):
    """Alternate: 10 backends started directly, then the same 10 loads through the daemon."""
    names = [f"m{i}" for i in range(N_FAST)]
    walls, directs, direct_ones, after_ready, failures = [], [], [], [], []
    for rnd in range(rounds):
        direct_ones.append(launch_direct(tmp, 1, f"one{rnd}")[0])
        directs.append(launch_direct(tmp, N_FAST, f"ten{rnd}")[0])
        for name in names:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(daemon.times_file(name))
        start = now()
        cids = [daemon.control.send("load-model", name)[0] for name in names]
        replies = daemon.control.wait(cids, 30.0)
        walls.append(max(received for _, received in replies.values()) - start)
        failures += [reply for reply, _ in replies.values() if not load_ok(reply)]
        for cid, name in zip(cids, names):
            listening = read_times(daemon.times_file(name)).get("listening")
            if listening:
                after_ready.append(replies[cid][1] - listening[-1])
        if rnd < rounds - 1:          # the last round leaves them loaded, for figures 5 and 6
            unload_all(daemon, names)
    return {"walls": walls, "wall": statistics.median(walls), "failures": failures,
            "after_ready": after_ready, "direct_one": statistics.median(direct_ones),
            "direct_ten": statistics.median(directs), "directs": directs}


def fig4_crash(daemon, rounds):
    detect, codes, messages = [], [], []
    path = daemon.times_file("crash")
    for _ in range(rounds):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        reply, sent, received = daemon.control.call("load-model", "crash", timeout=15.0)
        exit_times = read_times(path).get("exit")
        if exit_times:
            detect.append(received - exit_times[-1])
        last_exit = (reply.get("data") or {}).get("last_exit") or {}
        codes.append((reply.get("success"), reply.get("code"), last_exit.get("code")))
        messages.append(reply.get("error"))
    daemon.control.call("unload-model", "crash", timeout=10.0)
    return {"detect": detect, "codes": codes, "message": messages[-1] if messages else None}


def sequential_rtt(context, endpoint, count, warmup=300):
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 5000)
    sock.connect(endpoint)
    payload = json.dumps({"command": "status", "params": {},
                          "correlation_id": str(uuid.uuid4())}).encode()
    times = []
    try:
        for i in range(warmup + count):
            start = time.perf_counter()
            sock.send(payload)
            reply = sock.recv()
            elapsed = time.perf_counter() - start
            if i >= warmup:
                times.append(elapsed)
        json.loads(reply)   # the last one, to be sure it is a reply
    finally:
        sock.close(linger=0)
    return times


def threaded_throughput(context, endpoint, threads=8, duration=3.0):
    counts = [0] * threads
    errors = []
    barrier = threading.Barrier(threads + 1)
    stop_at = [None]

    def worker(index):
        sock = context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVTIMEO, 5000)
        sock.connect(endpoint)
        payload = json.dumps({"command": "status", "params": {},
                              "correlation_id": f"t{index}"}).encode()
        try:
            sock.send(payload)       # connect and warm up
            sock.recv()
            barrier.wait(10)
            count = 0
            while now() < stop_at[0]:
                sock.send(payload)
                sock.recv()
                count += 1
            counts[index] = count
        except Exception as exc:   # reported, not raised
            errors.append(repr(exc))
        finally:
            sock.close(linger=0)

    workers = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(threads)]
    for w in workers:
        w.start()
    stop_at[0] = now() + 3600
    barrier.wait(10)
    start = now()
    stop_at[0] = start + duration
    for w in workers:
        w.join(duration + 10)
    elapsed = now() - start
    return sum(counts) / elapsed, errors


STATUS_REQUEST = json.dumps({"command": "status", "params": {},
                             "correlation_id": "bench-status"}).encode()


def fresh_dealer_rtt(context, endpoint, count):
    """``count`` status round trips, each on a new DEALER (connect, send, reply), as the CLI
    does; the seconds of each and the last reply's bytes."""
    times, reply = [], None
    for _ in range(count):
        sock = context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVTIMEO, 5000)
        try:
            start = time.perf_counter()
            sock.connect(endpoint)
            sock.send(STATUS_REQUEST)
            reply = sock.recv()
            times.append(time.perf_counter() - start)
        finally:
            sock.close(linger=0)
    return times, reply


def fig5_rtt(context, tmp, daemon, quick, rounds=None):
    """The daemon against the same-bytes floor, in alternated rounds (the machine is shared
    and noisy: each round compares two batches taken moments apart)."""
    rounds = rounds or (8 if quick else 16)
    per_batch = 150 if quick else 300
    _, reply = fresh_dealer_rtt(context, daemon.control_endpoint, 1)
    if not json.loads(reply).get("success"):
        raise RuntimeError(f"status failed: {reply[:200]!r}")
    reply_file = os.path.join(tmp, "status-reply.json")
    with open(reply_file, "wb") as stream:
        stream.write(reply)
    base_endpoint = "ipc://" + os.path.join(tmp, "base.sock")
    baseline = subprocess.Popen([PYTHON, BASELINE_SERVER, base_endpoint, reply_file],
                                env=clean_env(), stdin=subprocess.DEVNULL,
                                start_new_session=True)
    try:
        if not wait_for(lambda: os.path.exists(base_endpoint[6:]), 10.0):
            raise RuntimeError("baseline server did not bind")
        endpoints = {"daemon": daemon.control_endpoint, "base": base_endpoint}
        for endpoint in endpoints.values():
            fresh_dealer_rtt(context, endpoint, 100)            # warm up both
        medians = {"daemon": [], "base": []}
        everything = {"daemon": [], "base": []}
        cpu = {"daemon": 0.0, "base": 0.0}
        processes = {"daemon": daemon.ps, "base": psutil.Process(baseline.pid)}
        for rnd in range(rounds):
            order = ("daemon", "base") if rnd % 2 == 0 else ("base", "daemon")
            for key in order:
                before = sum(processes[key].cpu_times()[:2])
                times, _ = fresh_dealer_rtt(context, endpoints[key], per_batch)
                cpu[key] += sum(processes[key].cpu_times()[:2]) - before
                medians[key].append(statistics.median(times))
                everything[key] += times
        ratios = [d / b for d, b in zip(medians["daemon"], medians["base"])]
        result = {"rounds": rounds, "per_batch": per_batch, "ratios": ratios,
                  "ratio": statistics.median(ratios), "reply_bytes": len(reply),
                  "daemon_rtt": everything["daemon"], "base_rtt": everything["base"],
                  "daemon_cpu": cpu["daemon"] / len(everything["daemon"]),
                  "base_cpu": cpu["base"] / len(everything["base"])}
        seq_daemon, seq_base = [], []
        for _ in range(2):
            seq_daemon += sequential_rtt(context, daemon.control_endpoint, 500)
            seq_base += sequential_rtt(context, base_endpoint, 500)
        result["seq_daemon"], result["seq_base"] = seq_daemon, seq_base
        duration = 1.5 if quick else 3.0
        result["daemon_tput"], result["daemon_tput_err"] = threaded_throughput(
            context, daemon.control_endpoint, duration=duration)
        result["base_tput"], result["base_tput_err"] = threaded_throughput(
            context, base_endpoint, duration=duration)
        return result
    finally:
        kill_group(baseline, grace=2.0)


def report_fig5(t, f5):
    t.section(f"5. status round trip, 10 models loaded, a fresh DEALER per request "
              f"({f5['reply_bytes']} reply bytes)")
    dr, br = f5["daemon_rtt"], f5["base_rtt"]
    t.row(f"daemon p50 ({len(dr)} requests)", fmt_ms(pct(dr, 50)), "")
    t.row(f"floor (same bytes, minimal ROUTER) p50 ({len(br)})", fmt_ms(pct(br, 50)), "")
    t.row(f"ratio daemon / floor (median of {f5['rounds']} alternated rounds of "
          f"{f5['per_batch']})", f"{f5['ratio']:8.2f}", "<= 1.3", f5["ratio"] <= 1.3)
    t.note("(each round: " + ", ".join(f"{r:.2f}" for r in f5["ratios"]) + ")")
    t.row("daemon p99", fmt_ms(pct(dr, 99)), "(info)")
    t.row("floor p99", fmt_ms(pct(br, 99)), "(info)")
    t.row("server CPU per request: daemon", f"{result_us(f5['daemon_cpu'])}", "(info)")
    t.row("server CPU per request: floor", f"{result_us(f5['base_cpu'])}", "(info)")
    sd, sb = f5["seq_daemon"], f5["seq_base"]
    t.row("one socket, sequential: daemon p50", fmt_ms(pct(sd, 50)), "(info)")
    t.row("one socket, sequential: floor p50", fmt_ms(pct(sb, 50)), "(info)")
    t.row("one socket, sequential: ratio (p50)", f"{pct(sd, 50) / pct(sb, 50):8.2f}", "(info)")
    t.row("throughput, 8 threads: daemon", f"{f5['daemon_tput']:8.0f} /s", "")
    t.row("throughput, 8 threads: floor", f"{f5['base_tput']:8.0f} /s", "")
    tr = f5["daemon_tput"] / f5["base_tput"] if f5["base_tput"] else float("nan")
    t.row("throughput ratio daemon / floor", f"{tr:8.2f}", ">= 0.77 (1/1.3)", tr >= 1 / 1.3)
    for err in (f5["daemon_tput_err"] + f5["base_tput_err"])[:3]:
        t.note(f"throughput error: {err}")


def load_ten(daemon):
    names = [f"m{i}" for i in range(N_FAST)]
    cids = [daemon.control.send("load-model", name)[0] for name in names]
    failed = [r for r, _ in daemon.control.wait(cids, 30.0).values() if not load_ok(r)]
    if failed:
        raise RuntimeError(f"loading m0..m{N_FAST - 1} failed: {failed[0]}")


# --- the report -------------------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds, < 60 s")
    parser.add_argument("--rtt-only", action="store_true",
                        help="only figure 5, the status round trip against the floor")
    parser.add_argument("--rounds", type=int, help="alternated rounds for figure 5")
    args = parser.parse_args(argv)
    quick = args.quick
    began = now()

    tmp = tempfile.mkdtemp(prefix="bm-", dir="/tmp")
    context = zmq.Context()
    daemon = Daemon(tmp)
    table = Table()
    status_client = None
    try:
        daemon.start(context)
        time.sleep(0.3)
        rss0 = daemon.ps.memory_info().rss
        print(f"daemon pid {daemon.process.pid}, runtime dir {daemon.run_dir}, "
              f"{'quick' if quick else 'full'} mode", flush=True)

        if args.rtt_only:
            print("5. status round trip vs the floor ...", flush=True)
            load_ten(daemon)
            report_fig5(table, fig5_rtt(context, tmp, daemon, quick, args.rounds))
            table.print()
            return 0

        print("1. load-model vs backend readiness ...", flush=True)
        f1 = fig1_load_vs_ready(context, daemon, 5 if quick else 10)

        print("3. 10 loads at once ...", flush=True)
        f3 = fig3_ten_at_once(tmp, daemon, 2 if quick else 3)

        print("5. status round trip vs the floor ...", flush=True)
        f5 = fig5_rtt(context, tmp, daemon, quick, args.rounds)
        rss10_after = daemon.ps.memory_info().rss

        print("6. idle CPU and RSS with 10 backends ...", flush=True)
        time.sleep(0.3)
        idle_seconds = 2.0 if quick else 5.0
        cpu_used, cpu_pct = idle_cpu(daemon.ps, idle_seconds)
        rss10 = daemon.ps.memory_info().rss
        children = [c for c in daemon.ps.children() if c.is_running()]
        unload_all(daemon, [f"m{i}" for i in range(N_FAST)])

        print("2. status during 5 slow loads ...", flush=True)
        status_client = Control(context, daemon.control_endpoint)
        status_client.call("status")
        f2 = fig2_status_during_loads(daemon, status_client, quick)

        print("4. crash at start ...", flush=True)
        f4 = fig4_crash(daemon, 3 if quick else 6)
        rss_end = daemon.ps.memory_info().rss

        # -- the table --
        t = table
        t.section("1. load-model reply vs the backend's own readiness (bind), startup 0.1 s")
        a = f1["after_ready"]
        t.row(f"bind -> reply p50 ({len(a)} loads)", fmt_ms(pct(a, 50)), "< 50 ms",
              pct(a, 50) < 0.050)
        t.row("bind -> reply max", fmt_ms(max(a) if a else float("nan")), "< 50 ms",
              bool(a) and max(a) < 0.050)
        h = f1["handshake"]
        t.row(f"handshake to endpoint p50 ({len(h)} ok, {len(f1['handshake_failures'])} "
              f"failed)", fmt_ms(pct(h, 50)), "answers", not f1["handshake_failures"])
        t.row("handshake to endpoint max", fmt_ms(max(h) if h else float("nan")), "")
        t.row("load-model wall time p50 (send -> reply)", fmt_ms(pct(f1["wall"], 50)),
              "(info)")

        t.section("2. status latency while 5 loads (startup 2 s) are in flight")
        s = f2["status"]
        t.row(f"status p50 ({len(s)} requests)", fmt_ms(pct(s, 50)), "< 10 ms",
              pct(s, 50) < 0.010)
        t.row("status p99", fmt_ms(pct(s, 99)), "< 10 ms", pct(s, 99) < 0.010)
        t.row("status max", fmt_ms(max(s)), "< 10 ms", max(s) < 0.010)
        t.row("first status, sent right after the 5 loads", fmt_ms(f2["first"]), "(info)")
        t.note("(5 worst: " + ", ".join(f"{ms(lat):.1f} ms at +{ms(off):.0f} ms"
                                        for lat, off in f2["worst"])
               + " after the loads were sent)")
        t.row("loads answered ready", f"{f2['loads_ok']} / {N_SLOW}", "5 / 5",
              f2["loads_ok"] == N_SLOW)

        t.section("3. 10 loads sent at once (10 models)")
        one = pct(f1["wall"], 50)
        t.row("one load alone (p50 from 1.)", fmt_ms(one), "(reference)")
        expected = one + f3["direct_ten"] - f3["direct_one"]
        t.row(f"10 loads: send -> last reply (median of {len(f3['walls'])})",
              fmt_ms(f3["wall"]), f"~ {ms(expected):.0f} ms (+10%)",
              f3["wall"] <= expected * 1.10)
        t.note("(each round: " + ", ".join(f"{ms(w):.0f}" for w in f3["walls"]) +
               " ms through the daemon; " + ", ".join(f"{ms(w):.0f}" for w in f3["directs"]) +
               " ms started directly)")
        t.row("same 10 started directly -> last bind (median)", fmt_ms(f3["direct_ten"]),
              "(floor)")
        t.row("one started directly -> bind (median)", fmt_ms(f3["direct_one"]), "(floor)")
        t.row("cost of 10 processes (10 direct - 1 direct)",
              fmt_ms(f3["direct_ten"] - f3["direct_one"]), "(info)")
        ar = f3["after_ready"]
        t.row("per model bind -> reply max", fmt_ms(max(ar) if ar else float("nan")),
              "< 50 ms", bool(ar) and max(ar) < 0.050)
        t.row("load failures", str(len(f3["failures"])), "0", not f3["failures"])

        t.section("4. crash at start (--fail-at-start 3)")
        d = f4["detect"]
        t.row(f"backend exit -> failed reply p50 ({len(d)})", fmt_ms(pct(d, 50)),
              "< 100 ms", pct(d, 50) < 0.100)
        t.row("backend exit -> failed reply max", fmt_ms(max(d) if d else float("nan")),
              "< 100 ms", bool(d) and max(d) < 0.100)
        good = all(c == (False, "load_failed", 3) for c in f4["codes"])
        t.row("reply: success=false, code, last_exit.code",
              ", ".join(sorted({f"{c[0]}/{c[1]}/{c[2]}" for c in f4["codes"]})),
              "False/load_failed/3", good)
        t.note(f"error: {f4['message']}")

        report_fig5(t, f5)

        t.section("6. daemon resources (no watchdog)")
        t.row(f"idle CPU over {idle_seconds:g} s, 10 backends loaded",
              f"{cpu_pct:8.2f} %", "0.0 %", cpu_used == 0.0)
        t.note(f"(cpu time used: {cpu_used * 1000:.1f} ms; clock tick is 10 ms; "
               f"{len(children)} backend children running)")
        t.row("RSS, 0 models (fresh)", f"{rss0 / MIB:8.1f} MiB", "< 35 MiB", rss0 < 35 * MIB)
        t.row("RSS, 10 models loaded", f"{rss10 / MIB:8.1f} MiB", "< 35 MiB", rss10 < 35 * MIB)
        t.row("RSS, 10 models (after 5.)", f"{rss10_after / MIB:8.1f} MiB", "< 35 MiB",
              rss10_after < 35 * MIB)
        t.row("RSS at the end", f"{rss_end / MIB:8.1f} MiB", "(info)")
        table.print()
    except Exception as exc:
        print(f"\nbenchmark aborted: {exc!r}", file=sys.stderr)
        print("daemon log tail:\n" + daemon.log_tail(), file=sys.stderr)
        if table.rows:
            table.print()
    finally:
        if status_client is not None:
            status_client.close()
        daemon.stop()
        context.destroy(linger=0)
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\ntotal time: {now() - began:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
