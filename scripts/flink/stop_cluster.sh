#!/usr/bin/env bash
# Stops every process that start_cluster.sh / start_taskmanager.sh recorded in
# $FLINK_RUNTIME_DIR/run/*.pid, and nothing else: SIGTERM first, SIGKILL after
# $FLINK_STOP_TIMEOUT seconds (default 20).
#
# Each recorded process was started with setsid, so it leads its own process
# group; the signal goes to that group (the worker pool's SDK harness
# children included). A PID whose kernel start time no longer matches the
# recorded one (recycled PID) is left alone.
#
# Usage: scripts/flink/stop_cluster.sh
set -uo pipefail
# shellcheck source=env.sh
. "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/env.sh"
STOP_TIMEOUT="${FLINK_STOP_TIMEOUT:-20}"

TARGETS=()   # "pid:pgid-or-empty:name"
for f in "$FLINK_RUN_DIR"/*.pid; do
  [ -e "$f" ] || continue
  name="$(basename "$f" .pid)"
  pid="$(cat "$f" 2>/dev/null || true)"
  start_file="${f%.pid}.start"
  if [ -z "$pid" ] || ! kill -0 "$pid" 2>/dev/null; then
    flink_log "$name: not running"
    rm -f "$f" "$start_file"
    continue
  fi
  if [ -s "$start_file" ] && [ "$(flink_proc_start_time "$pid" || true)" != "$(cat "$start_file")" ]; then
    flink_log "$name: pid $pid belongs to another process now; leaving it alone"
    rm -f "$f" "$start_file"
    continue
  fi
  pgid="$(ps -o pgid= -p "$pid" 2>/dev/null | tr -d ' ')"
  [ "$pgid" = "$pid" ] || pgid=""
  TARGETS+=("$pid:$pgid:$name")
done

send() {  # send SIG pid pgid
  if [ -n "$3" ]; then kill -s "$1" -- "-$3" 2>/dev/null || true
  else kill -s "$1" "$2" 2>/dev/null || true; fi
}
group_alive() {  # group_alive pid pgid
  if [ -n "$2" ]; then kill -0 -- "-$2" 2>/dev/null; else kill -0 "$1" 2>/dev/null; fi
}

for t in "${TARGETS[@]}"; do
  IFS=: read -r pid pgid name <<<"$t"
  flink_log "stopping $name (pid $pid${pgid:+, process group $pgid})"
  send TERM "$pid" "$pgid"
done

deadline=$(( $(date +%s) + STOP_TIMEOUT ))
while :; do
  left=()
  for t in "${TARGETS[@]}"; do
    IFS=: read -r pid pgid name <<<"$t"
    group_alive "$pid" "$pgid" && left+=("$t")
  done
  [ ${#left[@]} -eq 0 ] && break
  if [ "$(date +%s)" -ge "$deadline" ]; then
    for t in "${left[@]}"; do
      IFS=: read -r pid pgid name <<<"$t"
      flink_log "$name did not stop in ${STOP_TIMEOUT}s: SIGKILL"
      send KILL "$pid" "$pgid"
    done
    sleep 1
    break
  fi
  sleep 0.5
done

rc=0
for t in "${TARGETS[@]}"; do
  IFS=: read -r pid pgid name <<<"$t"
  if group_alive "$pid" "$pgid"; then
    echo "[flink] ERROR: $name (pid $pid) still alive" >&2
    rc=1
  else
    rm -f "$FLINK_RUN_DIR/$name.pid" "$FLINK_RUN_DIR/$name.start"
  fi
done
if [ $rc -eq 0 ]; then
  rm -f "$FLINK_RUN_DIR/cluster.env"
  # temp files (job jars in blob stores, staged artifacts); logs and conf stay
  rm -rf "${FLINK_TMP_DIR:?}" "${FLINK_ARTIFACTS_DIR:?}"
fi
flink_log "stopped ${#TARGETS[@]} process(es)"
exit $rc
