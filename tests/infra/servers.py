"""Starting and stopping test servers as processes, by PID, on loopback only.

* `free_port()`: a free TCP port on 127.0.0.1.
* `Server`: one command started in its own session (process group = its PID),
  logging to a file; `wait_for_port` fails early when the process dies and
  shows the log's tail; `stop()` sends SIGTERM to that process group, then
  SIGKILL after a timeout, and checks that the PID and every descendant seen
  while it ran are gone.
* `listeners(pids)`: what `ss -ltnp` says the given processes listen on;
  `ListenerWatch` polls it in a thread while a test runs (gRPC servers of a
  job come and go with the job) and `non_loopback()` lists any socket bound
  to something other than 127.0.0.0/8 or ::1.

Only the standard library (no psutil): descendants come from /proc.
"""

from __future__ import annotations

import ipaddress
import os
import re
import signal
import socket
import subprocess
import threading
import time
from typing import Iterable, Optional

LOOPBACK = "127.0.0.1"


def free_port(host: str = LOOPBACK) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


# --- processes ---------------------------------------------------------------------------

def _children_map() -> dict:
    children: dict = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                stat = handle.read()
        except OSError:
            continue
        # the ppid is the 2nd field after the ")" that ends the command name
        fields = stat.rsplit(")", 1)[1].split()
        children.setdefault(int(fields[1]), []).append(int(entry))
    return children


def descendants(pid: int) -> set:
    """Every live descendant of `pid` (not `pid` itself)."""
    children = _children_map()
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def alive(pid: int) -> bool:
    """True when `pid` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def command_line(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return handle.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "?"


class Server:
    """A command run as a server process: started in its own session, stopped by PID.

    Usage:
        with Server("emulator", [...], log_path).start() as server:
            server.wait_for_port(port)
    """

    def __init__(self, name: str, cmd: list, log_path: str, *, env: Optional[dict] = None,
                 cwd: Optional[str] = None):
        self.name = name
        self.cmd = [str(c) for c in cmd]
        self.log_path = str(log_path)
        self.env = env
        self.cwd = cwd
        self.proc: Optional[subprocess.Popen] = None
        self.seen: set = set()  # every descendant seen while running (for the leak check)

    @property
    def pid(self) -> int:
        assert self.proc is not None, f"{self.name} not started"
        return self.proc.pid

    def start(self) -> "Server":
        os.makedirs(os.path.dirname(self.log_path) or ".", exist_ok=True)
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         env=self.env, cwd=self.cwd, start_new_session=True)
        finally:
            log.close()
        return self

    def log_tail(self, lines: int = 40) -> str:
        try:
            with open(self.log_path, errors="replace") as handle:
                return "".join(handle.readlines()[-lines:])
        except OSError:
            return ""

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def note_descendants(self) -> set:
        if self.running():
            self.seen |= descendants(self.pid)
        return self.seen

    def wait_for_port(self, port: int, host: str = LOOPBACK, timeout: float = 60.0) -> None:
        """Waits until host:port accepts connections; RuntimeError (with the log) on death or timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.running():
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode} before listening on "
                                   f"{host}:{port}; log {self.log_path}:\n{self.log_tail()}")
            if port_open(host, port):
                return
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} not listening on {host}:{port} after {timeout:.0f} s; "
                           f"log {self.log_path}:\n{self.log_tail()}")

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM to the process group (= our PID), SIGKILL after `timeout`; then checks nothing is left."""
        if self.proc is None:
            return
        self.note_descendants()
        pid = self.proc.pid
        if self.proc.poll() is None:
            for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
                try:
                    os.killpg(pid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.proc.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        # descendants that left our process group (setsid) are stopped one by one, by PID
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(alive(p) for p in self.seen):
            time.sleep(0.1)
        for child in [p for p in self.seen if alive(p)]:
            try:
                os.kill(child, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def leftovers(self) -> list:
        """Processes of this server still alive after stop() (should be empty)."""
        pids = [self.proc.pid] if self.proc is not None and self.proc.poll() is None else []
        return [(p, command_line(p)) for p in pids + sorted(p for p in self.seen if alive(p))]

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


# --- listening sockets ----------------------------------------------------------------

_USERS = re.compile(r'\("([^"]*)",pid=(\d+),fd=\d+\)')


def _split_address(local: str) -> tuple:
    host, _, port = local.rpartition(":")
    host = host.strip("[]").split("%", 1)[0]
    return host, int(port) if port.isdigit() else port


def is_loopback(host: str) -> bool:
    if host in ("localhost",):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False  # "*", "0.0.0.0" parse fine; anything else (e.g. a name) is suspicious
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


def listeners(pids: Optional[Iterable[int]] = None) -> list:
    """[(host, port, pid, process name)] of listening TCP sockets (of `pids` when given), from `ss -ltnp`."""
    wanted = set(pids) if pids is not None else None
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, timeout=20, check=True).stdout
    found = []
    for line in out.splitlines():
        parts = line.split()
        if len(parts) < 5:
            continue
        host, port = _split_address(parts[3])
        users = _USERS.findall(line)
        for name, pid in users or [("?", "0")]:
            if wanted is None or int(pid) in wanted:
                found.append((host, port, int(pid), name))
    return found


def non_loopback(found: Iterable[tuple]) -> list:
    return sorted({f for f in found if not is_loopback(f[0])})


class ListenerWatch:
    """Polls `ss -ltnp` in a thread for the listeners of this process, `servers` and their descendants."""

    def __init__(self, *servers: Server, interval: float = 0.5, include_self: bool = True):
        self.servers = servers
        self.interval = interval
        self.include_self = include_self
        self.found: set = set()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def pids(self) -> set:
        roots = [s.pid for s in self.servers if s.running()]
        if self.include_self:
            roots.append(os.getpid())
        pids = set(roots)
        for root in roots:
            pids |= descendants(root)
        for server in self.servers:
            server.seen |= descendants(server.pid) if server.running() else set()
        return pids

    def poll(self) -> None:
        self.found |= set(listeners(self.pids()))

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.poll()
            except Exception:  # noqa: BLE001 - a failed poll must not kill the watch
                pass

    def __enter__(self) -> "ListenerWatch":
        self.poll()
        self._thread = threading.Thread(target=self._loop, name="ListenerWatch", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self.poll()

    def non_loopback(self) -> list:
        return non_loopback(self.found)
