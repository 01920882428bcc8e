"""Readiness checks for scripts/flink/*.sh (standard library only).

  wait_for.py port HOST PORT TIMEOUT [PIDFILE]
      until a TCP connect to HOST:PORT succeeds.
  wait_for.py taskmanagers REST_URL COUNT TIMEOUT [PIDFILE]
      until REST_URL/v1/overview reports at least COUNT TaskManagers.
  wait_for.py taskmanager-id REST_URL RESOURCE_ID TIMEOUT [PIDFILE]
      until REST_URL/v1/taskmanagers lists a TaskManager with that id.

  wait_for.py free HOST PORT...
      exit 0 if every PORT can be bound on HOST now, else 1 (names the busy ones).

With PIDFILE, gives up as soon as that process has died. Exit 0 when ready,
1 on timeout or death (with a message on stderr).
"""

import json
import os
import socket
import sys
import time
import urllib.request


def _alive(pidfile):
    if not pidfile:
        return True
    try:
        with open(pidfile) as f:
            os.kill(int(f.read().strip()), 0)
        return True
    except (OSError, ValueError):
        return False


def _get_json(url):
    with urllib.request.urlopen(url, timeout=3) as resp:
        return json.loads(resp.read().decode())


def _check(kind, a, b):
    if kind == "port":
        with socket.create_connection((a, int(b)), timeout=2):
            return True
    if kind == "taskmanagers":
        return int(_get_json(a.rstrip("/") + "/v1/overview").get("taskmanagers", 0)) >= int(b)
    if kind == "taskmanager-id":
        tms = _get_json(a.rstrip("/") + "/v1/taskmanagers").get("taskmanagers", [])
        return any(tm.get("id") == b for tm in tms)
    raise SystemExit("unknown check %r" % kind)


def _free(host, ports):
    busy = []
    for port in ports:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            # like the servers themselves: TIME_WAIT leftovers of a stopped
            # cluster do not block the port, a listener does
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, int(port)))
            except OSError:
                busy.append(port)
    if busy:
        sys.stderr.write("port(s) already in use on %s: %s\n" % (host, " ".join(busy)))
        return 1
    return 0


def main(argv):
    if argv and argv[0] == "free":
        return _free(argv[1], [p for p in argv[2:] if int(p) > 0])
    if len(argv) < 4:
        raise SystemExit(__doc__)
    kind, a, b, timeout = argv[0], argv[1], argv[2], float(argv[3])
    pidfile = argv[4] if len(argv) > 4 else None
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            if _check(kind, a, b):
                return 0
        except Exception as e:  # not up yet
            last = e
        if not _alive(pidfile):
            sys.stderr.write("process of %s died while waiting for %s %s %s\n" % (pidfile, kind, a, b))
            return 1
        time.sleep(0.5)
    sys.stderr.write("timeout after %ss waiting for %s %s %s (last error: %r)\n" % (timeout, kind, a, b, last))
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
