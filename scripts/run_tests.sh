#!/usr/bin/env bash
# The test suite on a fresh machine: set up (cached after the first run), then pytest on the CPU engine.
# Fails when a test fails and when no test ran. Extra arguments go to pytest.
set -uo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
bash "$repo/scripts/setup_cpu_env.sh" || { echo "environment set-up failed" >&2; exit 1; }
venv=${VTB_VENV:-${VTB_CACHE:-$HOME/.cache/vllm-transformers-backend}/venv}
cd "$repo"
start=$SECONDS
"$venv/bin/python" -m pytest tests -p no:cacheprovider -q -rfEs "$@"
rc=$?
echo "pytest exit code $rc after $((SECONDS - start)) s"
if [ "$rc" = 5 ]; then echo "no test ran: failing" >&2; exit 1; fi
exit "$rc"
