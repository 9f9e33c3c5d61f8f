#!/usr/bin/env bash
# Installs the Debian packages that the tests need beyond Python (idempotent; a second run installs
# nothing): nginx, the L7 gRPC load balancer of tests/test_loadbalancing.py and bench/lb.py, and
# chromium, the headless browser that screenshots a report in tests/test_report_atlas.py.
# Run as root (CI) or with sudo; without either it only reports what is missing.
set -euo pipefail
packages=(nginx chromium)
missing=()
for package in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$package")
  fi
done
if [ "${#missing[@]}" -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" -eq 0 ]; then
  sudo=()
elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
  sudo=(sudo -n)
else
  echo "ci-system-deps: missing ${missing[*]}; install them as root: apt-get install -y ${missing[*]}" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -qq
"${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
# The tests run nginx in the foreground from a private prefix: stop the packaged service that the
# install may have started (it would hold port 80 for nothing).
if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
  "${sudo[@]}" systemctl disable --now nginx >/dev/null 2>&1 || true
elif command -v invoke-rc.d >/dev/null; then
  "${sudo[@]}" invoke-rc.d nginx stop >/dev/null 2>&1 || true
fi
echo "ci-system-deps: installed ${missing[*]}"
