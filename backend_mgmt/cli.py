"""The backend-mgmt command: one function per subcommand, outcomes mapped to exit codes."""

import argparse
import difflib
import grp
import importlib
import json
import logging
import os
import pwd
import shutil
import subprocess
import sys
import threading
import time

from . import __version__, client, config as config_module, files, logsetup, runtime
from .launchers import systemd as systemd_launcher

EXIT_OK = 0
EXIT_SERVICE_ERROR = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 69       # EX_UNAVAILABLE (also serve: cannot start, e.g. socket taken)
EXIT_CANTCREAT = 73         # EX_CANTCREAT: metrics --output cannot be written
EXIT_CONFIG = 78            # EX_CONFIG

DEFAULT_TIMEOUT = 10.0
LONG_TIMEOUT = 3600.0       # loads and unloads are bounded by the model's own timeouts
UNIT_NAME = "backend-mgmt.service"
RUNNING_STATES = ("loading", "ready", "unloading")    # those with a process and an uptime
# Groups whose members may read the whole system journal on Debian.
JOURNAL_GROUPS = ("systemd-journal", "adm")


# -- subcommands that talk to the daemon -----------------------------------------------

def cmd_status(args):
    if args.watch and (args.json or args.interval <= 0):
        print("backend-mgmt: status --watch takes no --json, and a positive --interval",
              file=sys.stderr)
        return EXIT_USAGE
    reply = _call(args, "status")
    if reply is None or args.json or not reply["success"]:
        return _finish(args, reply)
    if args.watch:
        from . import watch

        def get_status():
            answer = _call(args, "status")
            return answer["data"] if answer and answer["success"] else None
        return watch.run(get_status, _print_status, reply["data"]["events_endpoint"],
                         interval=args.interval, count=args.count)
    _print_status(reply["data"])
    return EXIT_OK


def _print_status(data):
    print(f"backend-mgmt {data.get('version', '?')} {data['service_status']} "
          f"(pid {data.get('pid')}, up {_duration(data.get('uptime'))}, "
          f"launcher {data.get('launcher')})")
    print(f"control:   {data['cli_endpoint']}")
    print(f"handshake: {data['client_endpoint']}")
    _models_table(data["models"])


def _models_table(models):
    if not models:
        print("no models loaded")
        return
    rows = [("NAME", "TYPE", "STATE", "PID/UNIT", "UPTIME", "RESTARTS", "MEMORY", "CPU",
             "GPU MEMORY", "ENDPOINT / REASON")]
    for model in models:
        where = model.get("unit") or (str(model["pid"]) if model.get("pid") else "-")
        if model.get("unit") and model.get("unit_active") is False:
            where += " (gone)"
        detail = model["endpoint"] if model["state"] == "ready" else (
            model.get("error") or model.get("reason") or "")
        usage = model.get("usage") or {}
        gpu = usage.get("gpu_memory_bytes")
        rows.append((model["name"], model["type"], model["state"], where,
                     _duration(model["uptime"]) if model["state"] in RUNNING_STATES else "-",
                     str(model.get("restarts", 0)),
                     _bytes(usage.get("memory_bytes")),
                     "-" if usage.get("cpu_seconds") is None else f"{usage['cpu_seconds']:.1f}s",
                     " ".join(f"{device}:{_bytes(size)}" for device, size in sorted(gpu.items()))
                     if gpu else "-", detail))
    _table(rows)


def _bytes(count):
    """1.5GiB, 64.2MiB: binary units, as memory is sold and nvidia-smi counts."""
    if count is None:
        return "-"
    for unit, size in (("GiB", 1024 ** 3), ("MiB", 1024 ** 2), ("KiB", 1024)):
        if count >= size:
            return f"{count / size:.1f}{unit}"
    return f"{count}B"


def cmd_list_models(args):
    reply = _call(args, "list-models")
    if reply is None or args.json or not reply["success"]:
        return _finish(args, reply)
    rows = [("NAME", "TYPE", "STATE", "FULL NAME")]
    for model in reply["data"]["models"]:
        name = model["name"] + (" (default)" if model.get("default") else "")
        rows.append((name, model["type"], model["state"], model["fullname"]))
    _table(rows)
    return EXIT_OK


def cmd_load_model(args):
    params = {"model_name": args.name}
    if args.keep_alive is not None:
        params["keep_alive"] = args.keep_alive
    reply = _call(args, "load-model", params)
    if reply is not None and reply["success"] and not args.json:
        data = reply["data"]
        print(f"{data['model_name']} ready at {data['endpoint']} "
              f"(protocols: {', '.join(data['protocols']) or 'none'})")
        return EXIT_OK
    return _finish(args, reply)


def cmd_unload_model(args):
    reply = _call(args, "unload-model", {"model_name": args.name})
    if reply is not None and reply["success"] and not args.json:
        last_exit = reply["data"].get("last_exit") or {}
        print(f"{reply['data']['model_name']} unloaded"
              + (f" (backend {last_exit['description']})" if last_exit else ""))
        return EXIT_OK
    return _finish(args, reply)


def cmd_park_model(args):
    reply = _call(args, "park-model", {"model_name": args.name})
    if reply is not None and reply["success"] and not args.json:
        print(f"{reply['data']['model_name']} parked")
        return EXIT_OK
    return _finish(args, reply)


def cmd_reload_config(args):
    reply = _call(args, "reload-config", timeout=120)
    if reply is not None and reply["success"] and not args.json:
        print(f"configuration reloaded: {config_module.describe_change(reply['data'])}")
        return EXIT_OK
    if reply is not None and not reply["success"] and reply.get("code") == "config_invalid":
        if args.json:
            _print_json(reply)
            return EXIT_CONFIG
        for problem in (reply.get("data") or {}).get("problems", []):
            print(problem, file=sys.stderr)
        print("backend-mgmt: configuration not reloaded; the running one is unchanged",
              file=sys.stderr)
        return EXIT_CONFIG
    return _finish(args, reply)


def cmd_metrics(args):
    reply = _call(args, "metrics")
    if reply is None or args.json or not reply["success"]:
        return _finish(args, reply)
    text = reply["data"]["text"]
    if args.output:
        # Atomically, so the node exporter's textfile collector never reads half a file; and
        # safely, since this often runs as root from a timer (files.write_atomic).
        try:
            files.write_atomic(args.output, text)
        except files.WriteError as exc:
            print(f"backend-mgmt: {exc}", file=sys.stderr)
            return EXIT_CANTCREAT
    else:
        sys.stdout.write(text)
    return EXIT_OK


def cmd_events(args):
    """Follow the event stream: one line per state change (or the JSON with --json)."""
    import zmq
    endpoint = args.endpoint
    if endpoint is None:
        reply = _call(args, "status")
        if reply is None or not reply["success"]:
            return _finish(args, reply)
        endpoint = reply["data"]["events_endpoint"]
    context = zmq.Context()
    sock = context.socket(zmq.SUB)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SUBSCRIBE, b"")
    sock.connect(endpoint)
    seen = 0
    deadline = time.monotonic() + args.timeout if args.timeout else None
    try:
        while args.count is None or seen < args.count:
            wait_ms = None if deadline is None else max(0, int((deadline - time.monotonic())
                                                                 * 1000))
            if not sock.poll(wait_ms):
                break
            event = json.loads(sock.recv())
            seen += 1
            if args.json:
                print(json.dumps(event, sort_keys=True), flush=True)
            else:
                print(f"{event['time']}  {event['model']:<24} {event['state']:<10} "
                      f"{event.get('reason') or ''}", flush=True)
    except KeyboardInterrupt:
        pass
    finally:
        sock.close(linger=0)
        context.term()
    return EXIT_OK if args.count is None or seen >= args.count else EXIT_UNAVAILABLE


def cmd_stop_service(args):
    reply = _call(args, "stop-service")
    if reply is not None and reply["success"] and not args.json:
        print("backend-mgmt is stopping")
        return EXIT_OK
    return _finish(args, reply)


# -- subcommands that do not need the daemon --------------------------------------------

def cmd_serve(args):
    # The daemon's modules (which the CLI's other commands do not need) load in a thread
    # while the config is validated in a child process: start-up is on the clients' path.
    importer = threading.Thread(target=importlib.import_module, args=("backend_mgmt.daemon",),
                                name="import-daemon")
    importer.start()
    # The backend units a previous daemon left are listed meanwhile too (systemd_launcher.
    # UnitListing): what adoption waits for otherwise.
    listing = (systemd_launcher.UnitListing.start()
               if systemd_launcher.running_under_systemd() else None)
    path = config_module.config_path(args.config)
    from . import validated as validated_module     # only serve needs it (and hashlib)
    try:
        cfg, validated = validated_module.load_config(path, backend_path=args.backend_path)
    except config_module.ConfigError as exc:
        importer.join()
        if listing is not None:
            listing.close()
        logsetup.configure("INFO")
        for problem in exc.problems:
            logging.getLogger("backend_mgmt").error("%s", problem)
        return EXIT_CONFIG
    importer.join()
    from .daemon import Service   # raises here if it could not be imported
    logsetup.configure(args.log_level or cfg.log_level, cfg.log_format, cfg.log_date_format)
    if validated.spared:
        logging.getLogger("backend_mgmt").info(
            "%s: the same bytes as when last validated; checked, not validated again", path)
    service = Service(cfg, backend_path=args.backend_path, validated=validated,
                      unit_listing=listing)
    try:
        return service.serve()
    except runtime.StartupError as exc:
        logging.getLogger("backend_mgmt").critical("cannot start: %s", exc)
        return EXIT_UNAVAILABLE


def cmd_check_config(args):
    path = config_module.config_path(args.config)
    try:
        cfg = config_module.load(path, backend_path=getattr(args, "backend_path", None))
    except config_module.ConfigError as exc:
        if args.json:
            _print_json({"valid": False, "path": path, "problems": exc.problems})
        else:
            for problem in exc.problems:
                print(problem, file=sys.stderr)
        return EXIT_CONFIG
    notes = config_module.unenforced_notes(cfg)
    if args.json:
        _print_json({"valid": True, "path": cfg.path, "models": list(cfg.models),
                     "notes": notes})
    else:
        print(f"{cfg.path}: valid ({len(cfg.models)} models: {', '.join(cfg.models)})")
        for note in notes:
            print(f"{cfg.path}: {note}", file=sys.stderr)
    return EXIT_OK


def cmd_start_service(args):
    def done(code, started, how, message, log_path=None):
        if args.json:
            _print_json({"success": code == EXIT_OK, "started": started, "how": how,
                         "log": log_path, "message": message})
        else:
            print(message, file=sys.stdout if code == EXIT_OK else sys.stderr)
        return code

    if _systemd_running():
        result = subprocess.run(["systemctl", "start", UNIT_NAME], capture_output=args.json,
                                text=True)
        if result.returncode == 0:
            return done(EXIT_OK, True, "systemctl", f"{UNIT_NAME} started")
        return done(EXIT_SERVICE_ERROR, False, "systemctl",
                    f"systemctl start {UNIT_NAME} failed (exit {result.returncode})"
                    + (f": {result.stderr.strip()}" if args.json and result.stderr else ""))
    endpoint = _endpoint(args)
    try:
        client.request(endpoint, "status", timeout=2.0)
        return done(EXIT_OK, False, "serve", "backend-mgmt is already running")
    except client.Unreachable:
        pass
    path = config_module.config_path(args.config)
    cfg = _locations(args)
    log_path = os.path.join(runtime.runtime_dir(cfg), "daemon.log")
    os.makedirs(os.path.dirname(log_path), mode=0o750, exist_ok=True)
    with open(log_path, "ab") as log_file:
        subprocess.Popen([sys.executable, "-m", "backend_mgmt", "serve", "--config", path],
                         stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file,
                         start_new_session=True, close_fds=True)
    wait = args.timeout or DEFAULT_TIMEOUT
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        try:
            client.request(_endpoint(args), "status", timeout=1.0)
            return done(EXIT_OK, True, "serve", f"backend-mgmt started (log: {log_path})",
                        log_path)
        except client.Unreachable:
            time.sleep(0.1)
    return done(EXIT_UNAVAILABLE, False, "serve",
                f"backend-mgmt did not answer within {wait:g} s; see {log_path}", log_path)


def cmd_logs(args):
    """The daemon's journal, or one model's: every line about it, from the daemon and from
    its backends (units and child processes), loaded now or not, across daemon restarts."""
    name = None
    if args.name is not None:
        name, problem = _resolve_model(args, args.name)
        if problem:
            if args.json:
                _print_json({"success": False, "error": problem, "code": "unknown_model"})
            else:
                print(f"backend-mgmt: {problem}", file=sys.stderr)
            return EXIT_SERVICE_ERROR
    lines = ["-n", str(args.lines)] + (["-f"] if args.follow else [])
    output = ["-o", "json" if args.json else "short-iso"]
    if shutil.which("journalctl") and os.path.isdir("/run/systemd/journal"):
        missing = _journal_access_missing()
        if missing:
            print(f"backend-mgmt: {missing}", file=sys.stderr)
            return EXIT_SERVICE_ERROR
        if name is None:
            return _exec(["journalctl", "--no-pager", "-u", UNIT_NAME] + output + lines)
        # Lines the daemon writes about the model and its child-process backend's output
        # carry BACKEND_MGMT_MODEL; a unit backend's lines carry its SyslogIdentifier, the
        # same for every unit the model ever ran in.
        identifier = systemd_launcher.unit_name(name)[:-len(".service")]
        return _exec(["journalctl", "--no-pager"] + output + lines +
                     [f"BACKEND_MGMT_MODEL={name}", "+", f"SYSLOG_IDENTIFIER={identifier}"])
    cfg = _locations(args)
    log_path = os.path.join(runtime.runtime_dir(cfg), "daemon.log")
    if not os.path.exists(log_path):
        print(f"backend-mgmt: no journal here and no {log_path}: the daemon logs to the "
              f"terminal it was started from", file=sys.stderr)
        return EXIT_SERVICE_ERROR
    tag = f"[{name}]" if name else ""
    with open(log_path, errors="replace") as stream:
        lines = [line for line in stream if tag in line]
    sys.stdout.writelines(lines[-args.lines:] if args.lines > 0 else [])
    if not args.follow:
        return EXIT_OK
    tail = subprocess.Popen(["tail", "-n", "0", "-F", log_path], stdout=subprocess.PIPE,
                            text=True)
    try:
        for line in tail.stdout:
            if tag in line:
                sys.stdout.write(line)
                sys.stdout.flush()
    except KeyboardInterrupt:
        pass
    finally:
        tail.terminate()
    return EXIT_OK


def _resolve_model(args, name):
    """(canonical model name, None) or (None, why not) for a name given on the command line:
    from the daemon's list-models, else from the config file, else taken as it is."""
    reply = _call(args, "list-models", quiet=True, timeout=DEFAULT_TIMEOUT)
    if reply is not None and reply["success"]:
        models = [(m["name"], m.get("fullname") or m["name"]) for m in reply["data"]["models"]]
    else:
        try:
            cfg = config_module.load(config_module.config_path(args.config))
        except config_module.ConfigError:
            return name, None              # nothing to check against: take it as it is
        models = [(spec.name, spec.fullname) for spec in cfg.models.values()]
    for exact in (0, 1):
        for model in models:
            if model[exact] == name:
                return model[0], None
    names = [model[0] for model in models]
    close = [n for n in names if n.lower() == name.lower()] or \
        difflib.get_close_matches(name, names, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else \
        f" (configured: {', '.join(names) or 'none'})"
    return None, f"unknown model {name!r}{hint}"


def _journal_access_missing():
    """None if this user may read the system journal, else a line saying what is missing."""
    if os.geteuid() == 0:
        return None
    member_of = set()
    for gid in os.getgroups() + [os.getegid()]:
        try:
            member_of.add(grp.getgrgid(gid).gr_name)
        except KeyError:
            pass
    if member_of & set(JOURNAL_GROUPS):
        return None
    try:
        user = pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        user = str(os.geteuid())
    return (f"reading the service's journal needs membership in group "
            f"{' or '.join(JOURNAL_GROUPS)}, which {user} lacks (an administrator can add "
            f"you: usermod -aG systemd-journal {user}; then log in again)")


# -- helpers ---------------------------------------------------------------------------

def _locations(args):
    """Socket locations from the config, even an invalid or unreadable one (then defaults)."""
    return config_module.locations(config_module.config_path(args.config))


def _endpoint(args):
    return client.control_endpoint(_locations(args))


def _call(args, command, params=None, quiet=False, timeout=None):
    """The reply dict, or None after printing why the daemon could not be reached."""
    timeout = args.timeout if args.timeout is not None else timeout or (
        LONG_TIMEOUT if command in ("load-model", "unload-model", "park-model")
        else DEFAULT_TIMEOUT)
    endpoint = _endpoint(args)
    try:
        return client.request(endpoint, command, params, timeout=timeout,
                              coming_back=_service_coming_back())
    except client.PermissionDenied as exc:
        if not quiet:
            print(f"backend-mgmt: {exc}", file=sys.stderr)
        return None
    except client.Unreachable as exc:
        if not quiet:
            print(f"backend-mgmt: service not reachable at {endpoint}: {exc}", file=sys.stderr)
        return None


# A unit that stays inactive this long is not on its way back (a restart passes through
# inactive for a moment, between its stop and its start).
DOWN_GRACE = 1.0
COMING_BACK_STATES = ("active", "activating", "deactivating", "reloading")


def _service_coming_back():
    """For client.request: a check that says whether the daemon, missing right now, is on
    its way back (its unit restarting, crashed and about to be restarted, starting), so the
    CLI waits for it within its timeout; None where systemd does not run (nothing brings the
    daemon back by itself: say so at once)."""
    if not _systemd_running():
        return None
    down_since = []

    def coming_back():
        try:
            state = subprocess.run(["systemctl", "show", "-p", "ActiveState", "--value",
                                    UNIT_NAME], capture_output=True, text=True,
                                   timeout=5).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            state = ""
        if state in COMING_BACK_STATES:
            down_since.clear()
            return True
        now = time.monotonic()
        down_since[:] = down_since or [now]
        return now - down_since[0] < DOWN_GRACE
    return coming_back


def _finish(args, reply):
    if reply is None:
        if args.json:
            _print_json({"success": False, "error": "service not reachable",
                         "code": "unreachable"})
        return EXIT_UNAVAILABLE
    if args.json:
        _print_json(reply)
    elif not reply["success"]:
        print(f"backend-mgmt: {reply['error']} [{reply.get('code')}]", file=sys.stderr)
        for line in (reply.get("data") or {}).get("output") or []:
            print(f"  | {line}", file=sys.stderr)
    return EXIT_OK if reply["success"] else EXIT_SERVICE_ERROR


def _print_json(document):
    print(json.dumps(document, indent=2, sort_keys=True))


def _table(rows):
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip())


def _duration(seconds):
    if seconds is None:
        return "-"
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _systemd_running():
    return os.path.isdir("/run/systemd/system") and shutil.which("systemctl") is not None


def _exec(command):
    try:
        return subprocess.call(command)
    except KeyboardInterrupt:
        return EXIT_OK


# -- argument parsing ------------------------------------------------------------------

def build_parser():
    # Global options are accepted before and after the subcommand: the subparsers share a
    # parent whose defaults are SUPPRESS, so a value given after the subcommand wins and
    # one given before it is not overwritten.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", default=argparse.SUPPRESS, metavar="PATH",
                        help="config file (default: $BACKEND_MGMT_CONFIG or "
                             f"{config_module.DEFAULT_CONFIG_PATH})")
    common.add_argument("--timeout", type=float, default=argparse.SUPPRESS, metavar="SECONDS",
                        help=f"how long to wait for the daemon's reply (default "
                             f"{DEFAULT_TIMEOUT:g} s; load-model and unload-model: "
                             f"{LONG_TIMEOUT:g} s, as the model's own timeouts bound them)")
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="machine-readable output: one JSON document on stdout (events "
                             "and logs: one JSON object per line)")

    parser = argparse.ArgumentParser(
        prog="backend-mgmt", parents=[common],
        description="Run model backends on this host, and talk to the daemon that runs them.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="subcommand", metavar="SUBCOMMAND")
    sub.required = True

    def add(name, func, help_text):
        sub_parser = sub.add_parser(name, parents=[common], help=help_text,
                                    description=help_text)
        sub_parser.set_defaults(func=func)
        return sub_parser

    serve = add("serve", cmd_serve, "run the daemon in the foreground")
    serve.add_argument("--backend-path", metavar="DIR",
                       help="directory of backend scripts named in model_backends")
    serve.add_argument("--log-level", metavar="LEVEL",
                       help="DEBUG, INFO, WARNING or ERROR (default: logging.level of the "
                            "config, else INFO)",
                       choices=["DEBUG", "INFO", "WARNING", "ERROR", "debug", "info", "warning",
                                "error"])
    check = add("check-config", cmd_check_config, "validate the configuration (exit 0 or 78)")
    check.add_argument("--backend-path", metavar="DIR",
                       help="directory of backend scripts named in model_backends")
    status = add("status", cmd_status, "service status and loaded models")
    status.add_argument("--watch", action="store_true",
                        help="a live view, redrawn on each event and every --interval seconds")
    status.add_argument("--interval", type=float, default=5.0, metavar="S",
                        help="with --watch: redraw at least this often (default 5)")
    status.add_argument("--count", type=int, metavar="N", help="with --watch: exit after "
                                                               "N redraws")
    load = add("load-model", cmd_load_model, "load a model; returns when it is ready or failed")
    load.add_argument("name", metavar="NAME", help="the model's name or full name")
    load.add_argument("--keep-alive", type=float, metavar="S",
                      help="unload after S idle seconds (-1: never, 0: as soon as idle), "
                           "for this load")
    unload = add("unload-model", cmd_unload_model, "stop a model's backend")
    unload.add_argument("name", metavar="NAME", help="the model's name or full name")
    park = add("park-model", cmd_park_model, "park a ready model: GPU memory released, "
                                             "process kept; a load or handshake wakes it")
    park.add_argument("name", metavar="NAME", help="the model's name or full name")
    add("list-models", cmd_list_models, "every configured model and its state")
    add("stop-service", cmd_stop_service, "ask the daemon to shut down cleanly")
    events = add("events", cmd_events,
                 "follow the event stream (every model state change); with --json one JSON "
                 "object per line")
    events.add_argument("--count", type=int, metavar="N", help="exit after N events")
    events.add_argument("--endpoint", metavar="EP", help="the events socket (default: ask "
                                                         "the daemon)")
    metrics_parser = add("metrics", cmd_metrics, "the daemon's metrics, Prometheus text format")
    metrics_parser.add_argument("--output", metavar="FILE",
                                help="write them to FILE (e.g. for node_exporter's textfile "
                                     "collector) instead of stdout")
    add("reload-config", cmd_reload_config,
        "re-read the configuration; an invalid one is refused (exit 78)")
    add("start-service", cmd_start_service,
        "start the daemon (systemctl where systemd runs, else a detached serve)")
    logs = add("logs", cmd_logs, "the daemon's log, or one model's (reading the journal "
                                 "needs group systemd-journal or adm); --json: journal "
                                 "entries as JSON lines")
    logs.add_argument("name", nargs="?", metavar="NAME",
                      help="a configured model: its lines from the daemon and from every "
                           "backend it ran in, loaded now or not")
    logs.add_argument("-n", "--lines", type=int, default=50, metavar="N",
                      help="show the last N lines (default 50)")
    logs.add_argument("-f", "--follow", action="store_true",
                      help="keep printing new lines as they come (also across loads)")
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    for option, default in (("config", None), ("timeout", None), ("json", False)):
        if not hasattr(args, option):
            setattr(args, option, default)
    if args.timeout is not None and args.timeout <= 0:
        parser.error("--timeout must be positive")
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
