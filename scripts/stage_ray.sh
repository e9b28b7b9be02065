#!/usr/bin/env bash
# Stages Ray for the GPU host (whose Python is 3.12 and which has no package index), for the Ray-executor
# case of tests/gpu/test_gpu_parallel.py. Run after ../shared/gpu/stage.sh (it uses .gpu/bin/zstd):
#
#   bash scripts/stage_ray.sh                 # writes .gpu/r00/ray.tzst (about 57 MB: one upload)
#
# On the host, after unpack.sh, carrying .gpu/bin and .gpu/r00:
#   LD_LIBRARY_PATH=.gpu/bin .gpu/bin/zstd -d --long=27 -q < .gpu/r00/ray.tzst | tar xf - -C /tmp
# and scripts/gpu_host_env.sh then puts /tmp/raysite on the path.
set -euo pipefail
work=${RAY_STAGE_WORK:-/tmp/ray-stage-work}
rm -rf "$work" && mkdir -p "$work/wheels" .gpu/r00
plat=(--only-binary=:all: --python-version 3.12 --implementation cp
      --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64)
# Ray's own requirements that neither the host nor the staged vLLM runtime has; protobuf stays below 6
# (Ray 2.37's generated code predates it).
python3 -m pip download -q --no-deps "${plat[@]}" -d "$work/wheels" \
  ray==2.37.0 msgpack "protobuf<6" aiosignal frozenlist filelock 2>&1 | grep -v "^WARNING: Location" || true
python3 -m pip install -q --no-deps --no-compile --target "$work/raysite" "${plat[@]}" "$work/wheels"/*.whl \
  2>&1 | grep -v "^WARNING" || true
tar cf - -C "$work" raysite | LD_LIBRARY_PATH=.gpu/bin .gpu/bin/zstd -T0 -12 --long=27 -q -f -o .gpu/r00/ray.tzst
ls -l .gpu/r00/ray.tzst
