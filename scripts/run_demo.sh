#!/usr/bin/env bash
# The main job on a fresh machine: set up (cached after the first run), then generate with SmolLM2
# through the Transformers backend on vLLM 0.6.2's CPU engine.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
bash "$repo/scripts/setup_cpu_env.sh"
venv=${VTB_VENV:-${VTB_CACHE:-$HOME/.cache/vllm-transformers-backend}/venv}
exec "$venv/bin/python" "$repo/examples/generate.py" --device cpu --dtype float32 "$@"
