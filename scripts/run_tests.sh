#!/usr/bin/env bash
# The test suite on a fresh machine: set up (cached after the first run), then pytest on vLLM 0.6.2's CPU
# engine once per transformers version of the matrix, switching transformers inside one venv.
#
#   bash scripts/run_tests.sh [PYTEST ARGS...]
#   TRANSFORMERS_MATRIX="4.57.6" bash scripts/run_tests.sh -k llama     # one leg, a subset
#
# Each leg is reported by name. The run fails when any leg fails, and when a leg ran no test.
set -uo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
matrix=${TRANSFORMERS_MATRIX:-"4.48.3 4.57.6 5.13.1"}
default_tf=${TRANSFORMERS_VERSION:-4.57.6}
bash "$repo/scripts/setup_cpu_env.sh" || { echo "environment set-up failed" >&2; exit 1; }
venv=${VTB_VENV:-${VTB_CACHE:-$HOME/.cache/vllm-transformers-backend}/venv}
cd "$repo"

declare -A leg_rc leg_summary
total_passed=0 total_failed=0 total_skipped=0 status=0
for tf in $matrix; do
  echo "=== leg transformers==$tf"
  if ! "$venv/bin/python" -m pip install -q --disable-pip-version-check "transformers==$tf" 2>&1 \
      | grep -v "^WARNING: Location"; then :; fi
  have=$("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("transformers"))')
  if [ "$have" != "$tf" ]; then
    leg_rc[$tf]=1; leg_summary[$tf]="could not install transformers==$tf (have $have)"; status=1; continue
  fi
  log=$(mktemp)
  start=$SECONDS
  "$venv/bin/python" -m pytest tests -p no:cacheprovider -q -rfEs "$@" 2>&1 | tee "$log"
  rc=${PIPESTATUS[0]}
  last=$(grep -E "^(=+ )?[0-9]+ (passed|failed|skipped|error)" "$log" | tail -n1)
  count() { grep -oE "[0-9]+ $1" <<<"$last" | grep -oE "[0-9]+" || echo 0; }
  passed=$(count passed); skipped=$(count skipped); failed=$(( $(count failed) + $(count errors?) ))
  rm -f "$log"
  total_passed=$((total_passed + ${passed:-0})); total_failed=$((total_failed + ${failed:-0}))
  total_skipped=$((total_skipped + ${skipped:-0}))
  if [ "$rc" = 5 ] || [ "${passed:-0}" = 0 ]; then rc=1; last="no test ran"; fi
  leg_rc[$tf]=$rc; leg_summary[$tf]="$last ($((SECONDS - start)) s)"
  [ "$rc" = 0 ] || status=1
done

# Leave the venv on the default version for the main job.
"$venv/bin/python" -m pip install -q --disable-pip-version-check "transformers==$default_tf" 2>&1 \
  | grep -v "^WARNING: Location" || true

echo "=== transformers matrix"
for tf in $matrix; do
  printf '  transformers==%-8s %s  %s\n' "$tf" "$([ "${leg_rc[$tf]}" = 0 ] && echo PASS || echo FAIL)" "${leg_summary[$tf]}"
done
echo "matrix: $total_passed passed, $total_failed failed, $total_skipped skipped"
exit "$status"
