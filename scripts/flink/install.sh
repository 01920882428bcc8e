#!/usr/bin/env bash
# Installs everything the local Flink path needs, idempotently:
#   * Java (apt-get install openjdk-17-jre-headless if `java` is missing)
#   * Maven (apt-get install maven if `mvn` is missing)
#   * the Beam Flink job-server jar -> $FLINK_CLUSTER_DIR/jars/
#       1. the published org.apache.beam:beam-runners-flink-<minor>-job-server
#          jar via `mvn dependency:get`, if the registry serves it;
#       2. otherwise the same uber jar rebuilt with maven-shade from the
#          published runner artifacts (scripts/flink/jobserver/pom.xml).
#   * a Flink distribution (lib/ opt/ plugins/ bin/) taken from the PyPI
#     package apache-flink-libraries==$FLINK_VERSION (pip download + untar
#     of its deps/ folder, no install) -> $FLINK_CLUSTER_DIR/flink-<version>/
#   * libloopback_bind.so (gcc; apt-get install gcc if missing): LD_PRELOAD
#     shim keeping Beam's Java gRPC servers on 127.0.0.1 (loopback_bind.c)
#   * optionally (--beam-venv DIR, or FLINK_BEAM_VENV=DIR) a small venv with
#     apache-beam==$FLINK_BEAM_VERSION for the SDK worker pool / submitter.
#
# Usage: scripts/flink/install.sh [--prefix DIR] [--beam-venv DIR]
# Settings: see scripts/flink/env.sh.
set -euo pipefail

BEAM_VENV="${FLINK_BEAM_VENV:-}"
while [ $# -gt 0 ]; do
  case "$1" in
    --prefix) FLINK_CLUSTER_DIR="$(mkdir -p "$2" && cd "$2" && pwd)"; export FLINK_CLUSTER_DIR; shift 2 ;;
    --beam-venv) BEAM_VENV="$2"; shift 2 ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done

# shellcheck source=env.sh
. "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/env.sh"

T0=$(date +%s)
MAVEN_REPO_LOCAL="${MAVEN_REPO_LOCAL:-$HOME/.m2/repository}"
mkdir -p "$FLINK_CLUSTER_DIR" "$FLINK_JARS_DIR"
flink_log "prefix: $FLINK_CLUSTER_DIR (Beam $FLINK_BEAM_VERSION, Flink $FLINK_MINOR runner, Flink $FLINK_VERSION cluster)"

APT_UPDATED=0
apt_install() {
  command -v apt-get >/dev/null || flink_die "need $* but apt-get is not available; install it by hand"
  if [ "$APT_UPDATED" = 0 ]; then
    flink_log "apt-get update"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    APT_UPDATED=1
  fi
  flink_log "apt-get install $*"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# --- Java ---------------------------------------------------------------
if ! command -v java >/dev/null && [ ! -x "${JAVA_HOME:-/nonexistent}/bin/java" ]; then
  apt_install openjdk-17-jre-headless
else
  flink_log "java present: $("$(flink_java)" -version 2>&1 | head -n1)"
fi
JAVA_MAJOR="$("$(flink_java)" -XshowSettings:properties -version 2>&1 | sed -n 's/^ *java.specification.version = //p')"
case "$JAVA_MAJOR" in
  11|17) ;;
  *) echo "[flink] WARNING: Java $JAVA_MAJOR; Flink $FLINK_MINOR is tested on Java 11/17" >&2 ;;
esac

# --- Beam Flink job-server jar ------------------------------------------
if [ -s "$FLINK_JOB_SERVER_JAR" ]; then
  flink_log "job server jar present: $FLINK_JOB_SERVER_JAR"
else
  command -v mvn >/dev/null || apt_install maven
  ARTIFACT="beam-runners-flink-$FLINK_MINOR-job-server"
  flink_log "trying published $ARTIFACT:$FLINK_BEAM_VERSION from Maven Central"
  if mvn -q -B -U -Dmaven.repo.local="$MAVEN_REPO_LOCAL" dependency:get \
      -Dartifact="org.apache.beam:$ARTIFACT:$FLINK_BEAM_VERSION" -Dtransitive=false >/dev/null 2>&1; then
    cp "$MAVEN_REPO_LOCAL/org/apache/beam/$ARTIFACT/$FLINK_BEAM_VERSION/$ARTIFACT-$FLINK_BEAM_VERSION.jar" \
      "$FLINK_JOB_SERVER_JAR.part"
    mv "$FLINK_JOB_SERVER_JAR.part" "$FLINK_JOB_SERVER_JAR"
    flink_log "copied published job server jar"
  else
    flink_log "published job server jar not served; building it from beam-runners-flink-$FLINK_MINOR:$FLINK_BEAM_VERSION (maven-shade)"
    BUILD_DIR="$FLINK_CLUSTER_DIR/build/jobserver"
    rm -rf "$BUILD_DIR"
    mkdir -p "$BUILD_DIR"
    mvn -q -B -Dmaven.repo.local="$MAVEN_REPO_LOCAL" -f "$FLINK_SCRIPTS_DIR/jobserver/pom.xml" package \
      -Dbeam.version="$FLINK_BEAM_VERSION" -Dflink.minor="$FLINK_MINOR" -DbuildDir="$BUILD_DIR" \
      >"$FLINK_CLUSTER_DIR/build/jobserver-build.log" 2>&1 \
      || { tail -n 30 "$FLINK_CLUSTER_DIR/build/jobserver-build.log" >&2; flink_die "job server build failed"; }
    mv "$BUILD_DIR/beam-runners-flink-$FLINK_MINOR-job-server-$FLINK_BEAM_VERSION.jar" "$FLINK_JOB_SERVER_JAR"
    rm -rf "$BUILD_DIR"
    flink_log "built $FLINK_JOB_SERVER_JAR"
  fi
fi
# A quick sanity check that the jar has the driver class.
if command -v unzip >/dev/null; then
  unzip -l "$FLINK_JOB_SERVER_JAR" 'org/apache/beam/runners/flink/FlinkJobServerDriver.class' >/dev/null 2>&1 \
    || flink_die "$FLINK_JOB_SERVER_JAR lacks FlinkJobServerDriver"
fi

# --- loopback bind shim (LD_PRELOAD for the JVMs) ------------------------
SHIM_SRC="$FLINK_SCRIPTS_DIR/loopback_bind.c"
if [ -f "$FLINK_LOOPBACK_SHIM" ] && [ "$FLINK_LOOPBACK_SHIM" -nt "$SHIM_SRC" ]; then
  flink_log "loopback bind shim present: $FLINK_LOOPBACK_SHIM"
else
  command -v gcc >/dev/null || apt_install gcc libc6-dev
  mkdir -p "$(dirname "$FLINK_LOOPBACK_SHIM")"
  gcc -shared -fPIC -O2 -Wall -o "$FLINK_LOOPBACK_SHIM.part" "$SHIM_SRC" -ldl
  mv "$FLINK_LOOPBACK_SHIM.part" "$FLINK_LOOPBACK_SHIM"
  flink_log "built loopback bind shim: $FLINK_LOOPBACK_SHIM"
fi

# --- pip (for downloads and the optional venv) --------------------------
pick_pip_python() {
  local py
  for py in "$BEAM_PYTHON" "$(command -v python3 || true)"; do
    [ -n "$py" ] && [ -x "$py" ] && "$py" -m pip --version >/dev/null 2>&1 && { echo "$py"; return; }
  done
  return 1
}

# --- Flink distribution from apache-flink-libraries ---------------------
if [ -f "$FLINK_HOME_DIR/lib/flink-dist-$FLINK_VERSION.jar" ] && [ -f "$FLINK_HOME_DIR/bin/bash-java-utils.jar" ]; then
  flink_log "Flink $FLINK_VERSION present: $FLINK_HOME_DIR"
else
  PIP_PY="$(pick_pip_python)" || { apt_install python3-pip python3-venv; PIP_PY="$(pick_pip_python)"; }
  DL="$FLINK_CLUSTER_DIR/download"
  rm -rf "$DL" "$FLINK_HOME_DIR.part"
  mkdir -p "$DL" "$FLINK_HOME_DIR.part"
  flink_log "pip download apache-flink-libraries==$FLINK_VERSION (~230 MB)"
  "$PIP_PY" -m pip download -q --no-deps -d "$DL" "apache-flink-libraries==$FLINK_VERSION"
  ARCHIVE="$(ls "$DL"/apache[-_]flink[-_]libraries-"$FLINK_VERSION"* | head -n1)"
  case "$ARCHIVE" in
    *.tar.gz)
      tar -xzf "$ARCHIVE" -C "$FLINK_HOME_DIR.part" --strip-components=2 \
        "apache-flink-libraries-$FLINK_VERSION/deps" \
        || tar -xzf "$ARCHIVE" -C "$FLINK_HOME_DIR.part" --strip-components=2 \
             "apache_flink_libraries-$FLINK_VERSION/deps" ;;
    *.whl)  # a wheel keeps the same files under pyflink/
      "$PIP_PY" - "$ARCHIVE" "$FLINK_HOME_DIR.part" <<'EOF'
import sys, zipfile, os
src, dst = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(src) as z:
    for n in z.namelist():
        for d in ("lib/", "opt/", "plugins/", "bin/"):
            if n.startswith("pyflink/" + d) and not n.endswith("/"):
                out = os.path.join(dst, n[len("pyflink/"):])
                os.makedirs(os.path.dirname(out), exist_ok=True)
                with z.open(n) as i, open(out, "wb") as o:
                    o.write(i.read())
EOF
      ;;
    *) flink_die "unexpected download $ARCHIVE" ;;
  esac
  [ -f "$FLINK_HOME_DIR.part/lib/flink-dist-$FLINK_VERSION.jar" ] || flink_die "no flink-dist jar in $ARCHIVE"
  rm -rf "$FLINK_HOME_DIR"
  mv "$FLINK_HOME_DIR.part" "$FLINK_HOME_DIR"
  rm -rf "$DL"
  flink_log "Flink $FLINK_VERSION unpacked to $FLINK_HOME_DIR ($(du -sh "$FLINK_HOME_DIR" | cut -f1))"
fi

# --- optional venv with the matching apache-beam -----------------------
if [ -n "$BEAM_VENV" ]; then
  if [ -x "$BEAM_VENV/bin/python" ] && \
     [ "$("$BEAM_VENV/bin/python" -c 'import apache_beam; print(apache_beam.__version__)' 2>/dev/null)" = "$FLINK_BEAM_VERSION" ]; then
    flink_log "apache-beam $FLINK_BEAM_VERSION present in $BEAM_VENV"
  else
    PY3="$(command -v python3 || true)"
    [ -n "$PY3" ] && "$PY3" -m venv --help >/dev/null 2>&1 || apt_install python3 python3-venv
    "$(command -v python3)" -m venv "$BEAM_VENV" || { apt_install python3-venv; "$(command -v python3)" -m venv "$BEAM_VENV"; }
    flink_log "pip install apache-beam==$FLINK_BEAM_VERSION into $BEAM_VENV"
    "$BEAM_VENV/bin/python" -m pip install -q "apache-beam==$FLINK_BEAM_VERSION"
  fi
fi

# --- report --------------------------------------------------------------
if [ -n "$BEAM_VENV" ]; then
  flink_log "  use: BEAM_PYTHON=$BEAM_VENV/bin/python (apache-beam $FLINK_BEAM_VERSION) for the worker pool and the submitter"
elif [ -x "$BEAM_PYTHON" ]; then
  PYBEAM="$("$BEAM_PYTHON" -c 'import apache_beam; print(apache_beam.__version__)' 2>/dev/null || echo none)"
  if [ "$PYBEAM" != "$FLINK_BEAM_VERSION" ]; then
    echo "[flink] NOTE: $BEAM_PYTHON has apache-beam $PYBEAM, the job server is $FLINK_BEAM_VERSION;" \
         "set BEAM_PYTHON to a python with apache-beam==$FLINK_BEAM_VERSION (install.sh --beam-venv DIR)." >&2
  fi
fi
flink_log "done in $(( $(date +%s) - T0 ))s:"
flink_log "  job server: $FLINK_JOB_SERVER_JAR ($(du -h "$FLINK_JOB_SERVER_JAR" | cut -f1))"
flink_log "  flink:      $FLINK_HOME_DIR"
flink_log "  shim:       $FLINK_LOOPBACK_SHIM"
