#!/usr/bin/env bash
# Starts one more Flink TaskManager (a separate JVM, loopback only) for the
# session cluster started by start_cluster.sh, records its PID in
# $FLINK_RUNTIME_DIR/run/taskmanager-<N>.pid and waits until the JobManager
# lists it (resource id tm-<N>).
#
# Usage: scripts/flink/start_taskmanager.sh [N]   (default: next free N)
# Used by start_cluster.sh for the first TaskManager, and by fault tests that
# kill a TaskManager mid-job and start a replacement.
set -euo pipefail
# shellcheck source=env.sh
. "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/env.sh"

[ -f "$FLINK_RUN_DIR/cluster.env" ] || flink_die "no running cluster ($FLINK_RUN_DIR/cluster.env missing): run start_cluster.sh"
# shellcheck disable=SC1091
. "$FLINK_RUN_DIR/cluster.env"
flink_require_installed

N="${1:-}"
if [ -z "$N" ]; then
  N=1
  while [ -e "$FLINK_RUN_DIR/taskmanager-$N.pid" ]; do N=$((N + 1)); done
fi
NAME="taskmanager-$N"
flink_pid_alive "$FLINK_RUN_DIR/$NAME.pid" && flink_die "$NAME already running (pid $(cat "$FLINK_RUN_DIR/$NAME.pid"))"

JAVA="$(flink_java)"
DIST="$(flink_dist_jar)"
PARAMS="$("$JAVA" -cp "$FLINK_HOME_DIR/bin/bash-java-utils.jar:$DIST" \
  org.apache.flink.runtime.util.bash.BashJavaUtils GET_TM_RESOURCE_PARAMS \
  --configDir "$FLINK_CONF_DIR_GEN" 2>&1 | sed -n 's/^BASH_JAVA_UTILS_EXEC_RESULT://p')"
JVM_PARAMS="$(echo "$PARAMS" | sed -n 1p)"
DYN_CONFIGS="$(echo "$PARAMS" | sed -n 2p)"
[ -n "$JVM_PARAMS" ] || flink_die "BashJavaUtils GET_TM_RESOURCE_PARAMS gave no JVM params"

export FLINK_CONF_DIR="$FLINK_CONF_DIR_GEN" FLINK_HOME="$FLINK_HOME_DIR" \
  FLINK_LIB_DIR="$FLINK_HOME_DIR/lib" FLINK_OPT_DIR="$FLINK_HOME_DIR/opt" \
  FLINK_PLUGINS_DIR="$FLINK_HOME_DIR/plugins" FLINK_BIN_DIR="$FLINK_HOME_DIR/bin"
# shellcheck disable=SC2086
flink_spawn "$NAME" "$FLINK_LOG_DIR/$NAME.out" \
  env LD_PRELOAD="$FLINK_LOOPBACK_SHIM" "$JAVA" $JVM_PARAMS "${FLINK_JAVA17_OPTS[@]}" \
  -Dlog.file="$FLINK_LOG_DIR/$NAME.log" \
  -Dlog4j.configuration="file:$FLINK_CONF_DIR_GEN/log4j.properties" \
  -Dlog4j.configurationFile="file:$FLINK_CONF_DIR_GEN/log4j.properties" \
  -classpath "$FLINK_HOME_DIR/lib/*" \
  org.apache.flink.runtime.taskexecutor.TaskManagerRunner \
  --configDir "$FLINK_CONF_DIR_GEN" $DYN_CONFIGS -D "taskmanager.resource-id=tm-$N"

flink_wait_py taskmanager-id "http://127.0.0.1:$FLINK_REST_PORT" "tm-$N" "$FLINK_START_TIMEOUT" \
  "$FLINK_RUN_DIR/$NAME.pid" || { tail -n 20 "$FLINK_LOG_DIR/$NAME.log" "$FLINK_LOG_DIR/$NAME.out" >&2 || true; flink_die "$NAME did not register"; }
flink_log "$NAME registered (resource id tm-$N)"
