#!/usr/bin/env bash
# A transformers release for the GPU host as one small overlay on the staged vLLM 0.6.2 runtime (which carries
# 4.57.6), so that issue #19's transformers-5 GPU run needs one extra upload instead of a second staging.
#
#   bash scripts/stage_gpu_transformers.sh [VERSION]        # default 5.13.1; writes .gpu/t00/tf.tzst (~11 MB)
#
# On the GPU host, after ../shared/gpu's unpack.sh and with .gpu/bin and .gpu/t00 carried:
#   LD_LIBRARY_PATH=.gpu/bin .gpu/bin/zstd -d --long=27 -q < .gpu/t00/tf.tzst | tar xf - -C /tmp
#   source scripts/gpu_host_env.sh && export PYTHONPATH=/tmp/tfsite:$PYTHONPATH
# Wheels are for the host (CPython 3.12, manylinux x86_64); packages the host or the runtime already has
# (numpy, pyyaml, tokenizers, httpx, pydantic, tqdm, packaging) are left out.
set -euo pipefail
version=${1:-5.13.1}
repo=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m pip download -q --disable-pip-version-check --only-binary=:all: --python-version 3.12 \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
  --implementation cp -d "$work/w" "transformers==$version"
keep='^(transformers|huggingface_hub|hf_xet|safetensors|regex|fsspec|filelock|typing_extensions|typer|rich|click|shellingham|markdown_it_py|mdurl|pygments|annotated_doc)-'
mkdir -p "$work/tfsite"
for wheel in "$work"/w/*.whl; do
  if [[ $(basename "$wheel") =~ $keep ]]; then
    # unpacked, not installed: the wheels are for the host's Python, not this one (console scripts not needed)
    python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' "$wheel" "$work/tfsite"
  fi
done
mkdir -p "$repo/.gpu/t00"
tar cf - -C "$work" tfsite | LD_LIBRARY_PATH="$repo/.gpu/bin" "$repo/.gpu/bin/zstd" -q -19 --long=27 -o "$repo/.gpu/t00/tf.tzst" -f
ls -l "$repo/.gpu/t00/tf.tzst"
