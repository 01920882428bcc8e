#!/usr/bin/env bash
# Installs a headless-capable Chromium for the report's browser test (Debian/Ubuntu).
# Idempotent: does nothing when a Chromium/Chrome binary is already on PATH
# (or at $CHROMIUM). Needs root (or sudo) and apt access the first time.
#   scripts/install_chromium.sh        # install if missing, print the binary path
set -euo pipefail

find_browser() {
  if [[ -n "${CHROMIUM:-}" && -x "${CHROMIUM}" ]]; then echo "${CHROMIUM}"; return 0; fi
  local name
  for name in chromium chromium-browser google-chrome-stable google-chrome chrome; do
    if command -v "$name" >/dev/null 2>&1; then command -v "$name"; return 0; fi
  done
  return 1
}

if path=$(find_browser); then
  echo "$path"
  exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
  echo "install_chromium.sh: no Chromium found and no apt-get to install it; set CHROMIUM=/path/to/chrome" >&2
  exit 1
fi
SUDO=""
if [[ "$(id -u)" != "0" ]]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
    echo "install_chromium.sh: need root (or sudo) to apt-get install chromium" >&2
    exit 1
  fi
fi
export DEBIAN_FRONTEND=noninteractive
# Debian ships "chromium"; Ubuntu's "chromium-browser" is a snap shim, so prefer Debian's name.
if ! $SUDO apt-get install -y --no-install-recommends chromium >/dev/null 2>&1; then
  $SUDO apt-get update -qq >/dev/null
  $SUDO apt-get install -y --no-install-recommends chromium fonts-dejavu-core >/dev/null \
    || $SUDO apt-get install -y --no-install-recommends chromium-browser >/dev/null
fi
find_browser || { echo "install_chromium.sh: apt-get ran but no Chromium binary is on PATH" >&2; exit 1; }
