"""A booted Debian bookworm with a real systemd, in a systemd-nspawn container.

The machines that run this project are Debian VMs whose PID 1 is not systemd,
so the system test boots one in a container:

    base = ensure_base_root()                 # debootstrap once, then cached
    with Container(base, debs=[deb]) as c:    # fresh copy, .deb installed, booted
        c.run(["systemctl", "start", "backend-mgmt"])
    # powered off, systemd-nspawn gone, the copy removed

The base root is cached under CACHE_DIR, keyed on the suite, mirror and
package list, and every run works on a fresh copy of it, so runs start clean
and the cache is never modified. Every wait is bounded.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Callable, Sequence, TypeVar

T = TypeVar("T")

CACHE_DIR = Path(os.environ.get("BACKEND_MGMT_SYSTEST_CACHE", "/var/cache/backend-mgmt-systest"))
SUITE = "bookworm"
MIRROR = os.environ.get("BACKEND_MGMT_SYSTEST_MIRROR", "http://deb.debian.org/debian")

# Preinstalled in the base so that installing the .deb needs no download:
# systemd as PID 1, and the package's runtime dependencies (keep in step with
# debian/control; a missing one is fetched by apt at install time).
# python3-cffi-backend: debootstrap does not resolve the virtual package
# python3-zmq needs, so it is named here.
BASE_PACKAGES = (
    "systemd",
    "systemd-sysv",
    "dbus",
    "passwd",
    "procps",
    "python3",
    "python3-cffi-backend",
    "python3-zmq",
    "python3-yaml",
    "python3-psutil",
    "python3-jsonschema",
    "python3-protobuf",
)
# Bump when the way the base is made changes, to invalidate old caches.
BASE_RECIPE = 1

# Commands inside the container run with a plain environment: the host's PATH
# (pyenv shims, cargo, ...) means nothing in there.
CONTAINER_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "SYSTEMD_PAGER": "",
    "SYSTEMD_COLORS": "0",
    "TERM": "dumb",
}
HOST_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}

DEBOOTSTRAP_TIMEOUT = 900
BOOT_TIMEOUT = 90
POWEROFF_TIMEOUT = 60


class ContainerError(RuntimeError):
    pass


class GiveUp(Exception):
    """Raised by a wait_until condition to stop waiting at once: it cannot come true."""


def log(msg: str) -> None:
    print(f"[nspawn {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def wait_until(fn: Callable[[], T], timeout: float, interval: float = 0.25,
               what: str = "condition") -> T:
    """Call fn until it returns something truthy; return that. Raise after timeout.

    Exceptions from fn count as "not yet" (the last one is named in the error),
    except GiveUp, which ends the wait at once.
    """
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    last_val: object = None
    while True:
        try:
            last_val = fn()
            if last_val:
                return last_val  # type: ignore[return-value]
        except GiveUp:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure means "not yet"
            last_exc = exc
        if time.monotonic() >= deadline:
            detail = f"; last error: {last_exc!r}" if last_exc else f"; last value: {last_val!r}"
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}{detail}")
        time.sleep(interval)


def missing_prerequisites() -> list[str]:
    """Why this machine cannot boot a container (empty list: it can)."""
    problems = []
    if os.geteuid() != 0:
        problems.append("not running as root")
    for tool, pkg in (("systemd-nspawn", "systemd-container"), ("debootstrap", "debootstrap"),
                      ("nsenter", "util-linux")):
        if shutil.which(tool, path=HOST_ENV["PATH"]) is None:
            problems.append(f"{tool} not found (apt-get install {pkg})")
    if not Path("/sys/fs/cgroup").is_dir():
        problems.append("no /sys/fs/cgroup")
    return problems


# --- the cached base root ----------------------------------------------------

def base_key() -> str:
    spec = json.dumps({"suite": SUITE, "mirror": MIRROR, "packages": sorted(BASE_PACKAGES),
                       "recipe": BASE_RECIPE, "arch": os.uname().machine}, sort_keys=True)
    return hashlib.sha256(spec.encode()).hexdigest()[:12]


def ensure_base_root() -> Path:
    """The debootstrapped root for the current key; built on first use, then reused.

    Built in a temporary directory and renamed into place, so an interrupted
    build never leaves a half-made cache behind. Roots for other keys are removed.
    """
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    name = f"{SUITE}-{base_key()}"
    base = CACHE_DIR / name
    if (base / ".complete").exists():
        return base
    tmp = CACHE_DIR / f".building-{name}-{os.getpid()}"
    _rmtree(tmp)
    log(f"debootstrap {SUITE} into {tmp} (first run only, a minute or two)")
    started = time.monotonic()
    cmd = ["debootstrap", "--variant=minbase", "--include=" + ",".join(BASE_PACKAGES),
           SUITE, str(tmp), MIRROR]
    res = subprocess.run(cmd, env=HOST_ENV, stdin=subprocess.DEVNULL, capture_output=True,
                         text=True, timeout=DEBOOTSTRAP_TIMEOUT)
    if res.returncode != 0:
        _rmtree(tmp)
        raise ContainerError(f"debootstrap failed ({res.returncode}):\n{res.stdout[-3000:]}\n"
                             f"{res.stderr[-3000:]}")
    _prepare_base(tmp)
    (tmp / ".complete").write_text(json.dumps({"packages": BASE_PACKAGES, "built": time.time()}))
    _rmtree(base)
    os.rename(tmp, base)
    log(f"base root ready in {time.monotonic() - started:.0f}s: {base}")
    for other in CACHE_DIR.iterdir():
        if other.name.startswith(f"{SUITE}-") and other != base:
            log(f"removing stale base {other}")
            _rmtree(other)
    return base


def _prepare_base(root: Path) -> None:
    """One-time adjustments that make the root boot quickly and quietly."""
    (root / "etc/hostname").write_text("systest\n")
    # A machine-id makes journald keep persistent logs; empty would mean
    # "first boot" units running every time.
    (root / "etc/machine-id").write_text(uuid.uuid4().hex + "\n")
    # Nothing in the container should try to reach the (absent) network or a
    # getty on a console nobody reads.
    for unit in ("getty@tty1.service", "console-getty.service", "systemd-timesyncd.service",
                 "apt-daily.timer", "apt-daily-upgrade.timer", "e2scrub_all.timer",
                 "fstrim.timer"):
        link = root / "etc/systemd/system" / unit
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists() and not link.is_symlink():
            link.symlink_to("/dev/null")
    # dpkg inside: never prompt.
    (root / "etc/apt/apt.conf.d/90systest").write_text(
        'APT::Install-Recommends "false";\n'
        'Dpkg::Options { "--force-confdef"; "--force-confold"; };\n')


# --- the container -------------------------------------------------------------

class Container:
    """A fresh copy of the base root, packages installed, booted with systemd-nspawn.

    Use as a context manager, or call start() and stop() (stop is idempotent and
    always safe to call, also after a failed start).
    """

    def __init__(self, base: Path, debs: Sequence[Path] = (), setup: Callable[["Container"], None]
                 | None = None, name: str | None = None, keep_root: bool = False):
        self.base = base
        self.debs = [Path(d) for d in debs]
        self.setup = setup
        self.name = name or f"bmsys-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.keep_root = keep_root or os.environ.get("BACKEND_MGMT_SYSTEST_KEEP") == "1"
        runs = CACHE_DIR / "runs"
        runs.mkdir(parents=True, exist_ok=True)
        _remove_stale_runs(runs)
        self.rundir = runs / f"{os.getpid()}-{self.name}"
        self.root = self.rundir / "root"
        self.console_log = self.rundir / "console.log"
        self.proc: subprocess.Popen | None = None
        self.pid: int | None = None  # the container's systemd, as seen from the host
        self._console = None

    # -- lifecycle --

    def __enter__(self) -> "Container":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        t0 = time.monotonic()
        self.rundir.mkdir(parents=True)
        # cp -a keeps owners, modes, links, xattrs; reflinks where the fs can.
        subprocess.run(["cp", "-a", "--reflink=auto", str(self.base), str(self.root)],
                       check=True, env=HOST_ENV, timeout=300)
        (self.root / ".complete").unlink(missing_ok=True)
        log(f"root copied in {time.monotonic() - t0:.1f}s: {self.root}")
        self._install_debs()
        if self.setup is not None:
            self.setup(self)
        self._boot()
        log(f"container {self.name} up in {time.monotonic() - t0:.1f}s (pid {self.pid})")

    def _install_debs(self) -> None:
        """apt-get install the packages in a chroot, before boot (apt resolves
        dependencies; the booted container has no network)."""
        if not self.debs:
            return
        inside = []
        for deb in self.debs:
            dest = self.root / "var/tmp" / deb.name
            shutil.copy2(deb, dest)
            inside.append(f"/var/tmp/{deb.name}")
        res = subprocess.run(["chroot", str(self.root), "apt-get", "install", "-y", "-q",
                              "--no-install-recommends", *inside],
                             env={**CONTAINER_ENV, "DEBIAN_FRONTEND": "noninteractive"},
                             stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
        if res.returncode != 0:
            raise ContainerError(f"installing {inside} in the chroot failed ({res.returncode}):\n"
                                 f"{res.stdout[-4000:]}\n{res.stderr[-4000:]}")

    def _boot(self) -> None:
        self._console = open(self.console_log, "wb")
        cmd = ["systemd-nspawn", "--quiet", "-D", str(self.root), "--boot", "--register=no",
               "--keep-unit", "--private-network", "-M", self.name, "--console=read-only"]
        # Own session: a Ctrl-C aimed at pytest does not hit nspawn directly;
        # stop() powers the container off properly instead. Should this process
        # die without running stop() (SIGKILL, a CI timeout's SIGTERM), nspawn
        # gets SIGTERM, which halts the container.
        self.proc = subprocess.Popen(cmd, env=HOST_ENV, stdin=subprocess.DEVNULL,
                                     stdout=self._console, stderr=subprocess.STDOUT,
                                     start_new_session=True, preexec_fn=_die_with_parent)
        self.pid = wait_until(self._find_init, timeout=30, what="the container's systemd to exec")
        out = wait_until(self._booted, timeout=BOOT_TIMEOUT, interval=0.5,
                         what="systemctl is-system-running to settle")
        if out != "running":
            failed = self.run(["systemctl", "--failed", "--no-legend", "--plain"], check=False)
            log(f"system state {out!r}; failed units:\n{failed.stdout}")

    def _find_init(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is not None:
            raise ContainerError(f"systemd-nspawn exited with {self.proc.returncode} during boot:\n"
                                 f"{self.console_tail()}")
        for child in _children(self.proc.pid):
            try:
                comm = Path(f"/proc/{child}/comm").read_text().strip()
            except OSError:
                continue
            if comm == "systemd":
                return child
        return None

    def _booted(self) -> str | None:
        if self.proc is not None and self.proc.poll() is not None:
            raise ContainerError(f"systemd-nspawn exited with {self.proc.returncode} during boot:\n"
                                 f"{self.console_tail()}")
        res = self.run(["systemctl", "is-system-running"], check=False, timeout=10)
        state = res.stdout.strip()
        # "starting" until boot is over; "degraded" if some unit failed (logged).
        return state if state in ("running", "degraded") else None

    def stop(self) -> None:
        """Power off (falling back to signals), wait for systemd-nspawn, remove the root."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            try:
                if self.pid is not None:
                    self.run(["systemctl", "poweroff", "--no-block"], check=False, timeout=15)
                proc.wait(timeout=POWEROFF_TIMEOUT)
            except Exception as exc:  # noqa: BLE001 - fall through to harder ways
                log(f"poweroff did not finish ({exc!r}); using signals")
                self._force_stop(proc)
        self.pid = None
        if self._console is not None:
            self._console.close()
            self._console = None
        if self.rundir.exists():
            if self.console_log.exists():
                shutil.copy2(self.console_log, CACHE_DIR / "last-console.log")
            if proc is not None and proc.poll() is None:
                log(f"systemd-nspawn {proc.pid} survived SIGKILL; leaving {self.rundir} in place")
            elif self.keep_root:
                log(f"keeping {self.rundir} (BACKEND_MGMT_SYSTEST_KEEP=1)")
            else:
                _rmtree(self.rundir)

    def _force_stop(self, proc: subprocess.Popen) -> None:
        # SIGTERM to nspawn asks the container to halt; SIGKILL to the
        # container's PID 1 ends its whole PID namespace (nspawn then exits by
        # itself); SIGKILL to nspawn is the last resort.
        steps = [(lambda: os.killpg(proc.pid, signal.SIGTERM), 15)]
        if self.pid is not None:
            steps.append((lambda: os.kill(self.pid, signal.SIGKILL), 10))
        steps.append((lambda: os.killpg(proc.pid, signal.SIGKILL), 10))
        for send, grace in steps:
            if proc.poll() is not None:
                return
            try:
                send()
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass

    # -- inside the container --

    def run(self, argv: Sequence[str], check: bool = True, timeout: float = 60,
            input: str | None = None, user: str | None = None) -> subprocess.CompletedProcess:
        """Run argv inside the container (all its namespaces), as root or as user."""
        if self.pid is None:
            raise ContainerError("container is not running")
        argv = list(argv)
        if user is not None:
            argv = ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups",
                    "--reset-env", "--", *argv]
        cmd = ["nsenter", "-t", str(self.pid), "-a", "--", *argv]
        try:
            res = subprocess.run(cmd, env=CONTAINER_ENV, input=input, capture_output=True,
                                 text=True, timeout=timeout,
                                 stdin=None if input is not None else subprocess.DEVNULL)
        except subprocess.TimeoutExpired as exc:
            raise ContainerError(f"{argv} timed out after {timeout}s; output so far: "
                                 f"{exc.stdout!r} {exc.stderr!r}") from None
        if check and res.returncode != 0:
            raise ContainerError(f"{argv} exited {res.returncode}\nstdout: {res.stdout}\n"
                                 f"stderr: {res.stderr}")
        return res

    def sh(self, script: str, **kw) -> subprocess.CompletedProcess:
        return self.run(["sh", "-c", script], **kw)

    def write_file(self, path: str, content: str, mode: str = "0644") -> None:
        """Write a file through the container's own mount namespace (its /tmp,
        /run are its own tmpfs, invisible from the host's copy of the root)."""
        self.run(["sh", "-c", f'mkdir -p "$(dirname "$1")" && cat > "$1" && chmod {mode} "$1"',
                  "sh", path], input=content)

    def show(self, unit: str, *props: str) -> dict[str, str]:
        """systemctl show -p ... as a dict."""
        res = self.run(["systemctl", "show", unit, *(f"-p{p}" for p in props)])
        out = {}
        for line in res.stdout.splitlines():
            key, _, value = line.partition("=")
            out[key] = value
        return out

    def console_tail(self, n: int = 4000) -> str:
        try:
            return self.console_log.read_bytes()[-n:].decode(errors="replace")
        except OSError:
            return ""


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the parent (this test) dies."""
    import ctypes
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


def _remove_stale_runs(runs: Path) -> None:
    """Remove run directories left behind by test processes that no longer exist
    (and whose container is no longer running)."""
    for d in runs.iterdir():
        owner = d.name.split("-", 1)[0]
        if not owner.isdigit() or Path(f"/proc/{owner}").exists():
            continue
        if _nspawn_using(d / "root"):
            log(f"not removing {d}: a systemd-nspawn still runs on it")
            continue
        log(f"removing stale run directory {d}")
        _rmtree(d)


def _nspawn_using(root: Path) -> bool:
    needle = str(root).encode()
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"systemd-nspawn") and needle in argv:
            return True
    return False


def _rmtree(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        # The root holds device nodes and read-only bits; rm -rf copes.
        subprocess.run(["rm", "-rf", "--one-file-system", str(path)], check=True, env=HOST_ENV,
                       timeout=300)
