#!/usr/bin/env bash
# The whole shape sweep (tests/test_shape_sweep.py: every drawn case of every architecture, the embedding
# path too) on vLLM 0.6.2's CPU engine, with the transformers installed in the environment it runs in.
#
#   bash scripts/shape_sweep.sh [PYTEST ARGS...]          # e.g. -k gpt_neox, -x
#   PYTHON=/path/to/python bash scripts/shape_sweep.sh    # default: the set-up venv's python
#
# Prints pytest's result, the cases refused at load with their errors (the "shape sweep" section), the
# wall time, and says so when the test process died by a signal. Exit code: pytest's, 1 on a signal.
set -uo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
venv=${VTB_VENV:-${VTB_CACHE:-$HOME/.cache/vllm-transformers-backend}/venv}
python=${PYTHON:-$venv/bin/python}
[ -x "$python" ] || python=python3
cd "$repo"
echo "shape sweep: transformers $("$python" -c 'import transformers; print(transformers.__version__)'), $(getconf _NPROCESSORS_ONLN) cores"
start=$SECONDS
"$python" -X faulthandler -m pytest tests/test_shape_sweep.py --sweep -p no:cacheprovider -q -rfE "$@"
rc=$?
echo "shape sweep: $((SECONDS - start)) s, pytest exit code $rc"
if [ "$rc" -gt 128 ]; then
  echo "shape sweep: the test process died by signal $((rc - 128))" >&2
  exit 1
fi
exit "$rc"
