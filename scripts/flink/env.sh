# Shared settings for scripts/flink/*.sh (sourced, not executed).
# shellcheck shell=bash
# shellcheck disable=SC2034  # variables are used by the scripts that source this
#
# Every value can be overridden from the environment. Versions:
#   FLINK_BEAM_VERSION  Beam release of the Java job server. Must equal the
#                       apache-beam version of the Python SDK that submits
#                       and of the worker pool (2.62.0: the newest Beam whose
#                       Flink runner + job-service artifacts all resolve from
#                       Maven Central here).
#   FLINK_MINOR         Flink minor line of the runner (beam-runners-flink-<minor>).
#   FLINK_VERSION       apache-flink-libraries (PyPI) release used as the cluster.
# Ports (all bound on 127.0.0.1 only):
#   FLINK_RPC_PORT (6123)  FLINK_REST_PORT (8081)
#   BEAM_JOB_PORT (8099)   BEAM_ARTIFACT_PORT (8098)
#   BEAM_EXPANSION_PORT (-1 = Java expansion service disabled)
#   BEAM_WORKER_POOL_PORT (50000)
# Other:
#   FLINK_CLUSTER_DIR   install prefix (default <repo>/.cluster, git-ignored)
#   FLINK_RUNTIME_DIR   conf/ run/ logs/ tmp/ artifacts/ of a running cluster
#                       (default: FLINK_CLUSTER_DIR)
#   BEAM_PYTHON         python of the SDK worker pool (default <repo>/.venv/bin/python)
#   BEAM_POOL_PYTHONPATH  prepended to the pool's (and so every SDK harness's)
#                       PYTHONPATH; default <repo>, so code pickled by reference
#                       (e.g. dill, Beam 2.62's default pickler, and functions in
#                       tests/ modules) imports on the workers as in the submitter
#   FLINK_TM_SLOTS (2)  FLINK_TM_MEMORY (2048m)  FLINK_JM_MEMORY (1024m)
#   restart strategy (exponential-delay): FLINK_RESTART_ATTEMPTS (10, attempts
#   before the backoff resets)  FLINK_RESTART_INITIAL_BACKOFF (1 s)
#   FLINK_RESTART_MAX_BACKOFF (10 s)  FLINK_RESTART_BACKOFF_MULTIPLIER (2)
#   FLINK_HEARTBEAT_INTERVAL_MS (1000)  FLINK_HEARTBEAT_TIMEOUT_MS (6000)
#   FLINK_START_TIMEOUT (120 seconds per wait)

FLINK_SCRIPTS_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$FLINK_SCRIPTS_DIR/../.." && pwd)"

FLINK_BEAM_VERSION="${FLINK_BEAM_VERSION:-2.62.0}"
FLINK_MINOR="${FLINK_MINOR:-1.19}"
FLINK_VERSION="${FLINK_VERSION:-1.19.3}"

FLINK_CLUSTER_DIR="${FLINK_CLUSTER_DIR:-$REPO_ROOT/.cluster}"
FLINK_HOME_DIR="$FLINK_CLUSTER_DIR/flink-$FLINK_VERSION"
FLINK_JARS_DIR="$FLINK_CLUSTER_DIR/jars"
FLINK_JOB_SERVER_JAR="${FLINK_JOB_SERVER_JAR:-$FLINK_JARS_DIR/beam-runners-flink-$FLINK_MINOR-job-server-$FLINK_BEAM_VERSION.jar}"
# Runtime state of one running cluster (config, PIDs, logs, temp files, staged
# artifacts); several clusters can share one install with different
# FLINK_RUNTIME_DIRs and ports.
FLINK_RUNTIME_DIR="${FLINK_RUNTIME_DIR:-$FLINK_CLUSTER_DIR}"
FLINK_CONF_DIR_GEN="$FLINK_RUNTIME_DIR/conf"
FLINK_RUN_DIR="$FLINK_RUNTIME_DIR/run"
FLINK_LOG_DIR="$FLINK_RUNTIME_DIR/logs"
FLINK_TMP_DIR="$FLINK_RUNTIME_DIR/tmp"
FLINK_ARTIFACTS_DIR="$FLINK_RUNTIME_DIR/artifacts"
# LD_PRELOAD shim that rewrites wildcard binds to loopback (loopback_bind.c).
FLINK_LOOPBACK_SHIM="$FLINK_CLUSTER_DIR/lib/libloopback_bind.so"

FLINK_BIND_HOST=127.0.0.1
FLINK_RPC_PORT="${FLINK_RPC_PORT:-6123}"
FLINK_REST_PORT="${FLINK_REST_PORT:-8081}"
BEAM_JOB_PORT="${BEAM_JOB_PORT:-8099}"
BEAM_ARTIFACT_PORT="${BEAM_ARTIFACT_PORT:-8098}"
BEAM_EXPANSION_PORT="${BEAM_EXPANSION_PORT:--1}"
BEAM_WORKER_POOL_PORT="${BEAM_WORKER_POOL_PORT:-50000}"

FLINK_TM_SLOTS="${FLINK_TM_SLOTS:-2}"
FLINK_TM_MEMORY="${FLINK_TM_MEMORY:-2048m}"
FLINK_JM_MEMORY="${FLINK_JM_MEMORY:-1024m}"
FLINK_RESTART_ATTEMPTS="${FLINK_RESTART_ATTEMPTS:-10}"
FLINK_RESTART_INITIAL_BACKOFF="${FLINK_RESTART_INITIAL_BACKOFF:-1 s}"
FLINK_RESTART_MAX_BACKOFF="${FLINK_RESTART_MAX_BACKOFF:-10 s}"
FLINK_RESTART_BACKOFF_MULTIPLIER="${FLINK_RESTART_BACKOFF_MULTIPLIER:-2}"
FLINK_HEARTBEAT_INTERVAL_MS="${FLINK_HEARTBEAT_INTERVAL_MS:-1000}"
FLINK_HEARTBEAT_TIMEOUT_MS="${FLINK_HEARTBEAT_TIMEOUT_MS:-6000}"
FLINK_START_TIMEOUT="${FLINK_START_TIMEOUT:-120}"

BEAM_POOL_PYTHONPATH="${BEAM_POOL_PYTHONPATH-$REPO_ROOT}"

if [ -z "${BEAM_PYTHON:-}" ]; then
  if [ -x "$REPO_ROOT/.venv/bin/python" ]; then
    BEAM_PYTHON="$REPO_ROOT/.venv/bin/python"
  else
    BEAM_PYTHON="$(command -v python3 || true)"
  fi
fi

# JVM flags Flink needs on Java 17 (Flink's default env.java.opts.all).
FLINK_JAVA17_OPTS=(
  --add-exports=java.base/sun.net.util=ALL-UNNAMED
  --add-exports=java.rmi/sun.rmi.registry=ALL-UNNAMED
  --add-exports=jdk.compiler/com.sun.tools.javac.api=ALL-UNNAMED
  --add-exports=jdk.compiler/com.sun.tools.javac.file=ALL-UNNAMED
  --add-exports=jdk.compiler/com.sun.tools.javac.parser=ALL-UNNAMED
  --add-exports=jdk.compiler/com.sun.tools.javac.tree=ALL-UNNAMED
  --add-exports=jdk.compiler/com.sun.tools.javac.util=ALL-UNNAMED
  --add-exports=java.security.jgss/sun.security.krb5=ALL-UNNAMED
  --add-opens=java.base/java.lang=ALL-UNNAMED
  --add-opens=java.base/java.net=ALL-UNNAMED
  --add-opens=java.base/java.io=ALL-UNNAMED
  --add-opens=java.base/java.nio=ALL-UNNAMED
  --add-opens=java.base/sun.nio.ch=ALL-UNNAMED
  --add-opens=java.base/java.lang.reflect=ALL-UNNAMED
  --add-opens=java.base/java.text=ALL-UNNAMED
  --add-opens=java.base/java.time=ALL-UNNAMED
  --add-opens=java.base/java.util=ALL-UNNAMED
  --add-opens=java.base/java.util.concurrent=ALL-UNNAMED
  --add-opens=java.base/java.util.concurrent.atomic=ALL-UNNAMED
  --add-opens=java.base/java.util.concurrent.locks=ALL-UNNAMED
)

flink_log() { echo "[flink $(date +%H:%M:%S)] $*"; }
flink_die() { echo "[flink] ERROR: $*" >&2; exit 1; }

# True if the PID file names a live process.
flink_pid_alive() {
  local f="$1" pid
  [ -f "$f" ] || return 1
  pid="$(cat "$f" 2>/dev/null)"
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null
}

flink_java() {
  if [ -n "${JAVA_HOME:-}" ] && [ -x "$JAVA_HOME/bin/java" ]; then
    echo "$JAVA_HOME/bin/java"
  else
    command -v java || flink_die "java not found: run scripts/flink/install.sh"
  fi
}

flink_dist_jar() {
  ls "$FLINK_HOME_DIR"/lib/flink-dist-*.jar 2>/dev/null | head -n1
}

flink_require_installed() {
  [ -n "$(flink_dist_jar)" ] || flink_die "no Flink in $FLINK_HOME_DIR: run scripts/flink/install.sh"
  [ -f "$FLINK_JOB_SERVER_JAR" ] || flink_die "no job server jar $FLINK_JOB_SERVER_JAR: run scripts/flink/install.sh"
  [ -f "$FLINK_LOOPBACK_SHIM" ] || flink_die "no $FLINK_LOOPBACK_SHIM: run scripts/flink/install.sh"
  [ -n "$BEAM_PYTHON" ] && [ -x "$BEAM_PYTHON" ] || flink_die "BEAM_PYTHON not executable: '$BEAM_PYTHON'"
}

# Start a command detached in its own session (so its whole process group can
# be stopped by the recorded PID), log to a file and record its PID.
#   flink_spawn NAME LOGFILE CMD...
flink_spawn() {
  local name="$1" log="$2"; shift 2
  mkdir -p "$FLINK_RUN_DIR" "$FLINK_LOG_DIR"
  setsid "$@" </dev/null >>"$log" 2>&1 &
  local pid=$!
  echo "$pid" >"$FLINK_RUN_DIR/$name.pid"
  # The start time guards stop_cluster.sh against a recycled PID.
  flink_proc_start_time "$pid" >"$FLINK_RUN_DIR/$name.start" || true
  flink_log "started $name pid=$pid log=$log"
}

# Kernel start time (clock ticks since boot) of a PID; empty if gone.
flink_proc_start_time() {
  [ -r "/proc/$1/stat" ] || return 1
  # field 22 of /proc/PID/stat, counted after the ")" that ends the command name
  sed -e 's/^.*) //' "/proc/$1/stat" | cut -d' ' -f20
}

# Python (stdlib only) used for readiness checks.
flink_wait_py() {
  local py="$BEAM_PYTHON"
  [ -x "$py" ] || py="$(command -v python3)"
  "$py" "$FLINK_SCRIPTS_DIR/wait_for.py" "$@"
}
