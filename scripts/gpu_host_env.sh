# Sourced on the offline GPU host after ../shared/gpu's unpack.sh: the staged vLLM 0.6.2 runtime plus this
# checkout, arranged as an installed package would be (the backend with its patches subpackage, and the
# start-up hook .pth that patches vLLM on import). Usage: source scripts/gpu_host_env.sh
source .gpu/bin/env.sh
rm -rf /tmp/vtb && mkdir -p /tmp/vtb
cp -r vllm_transformers_backend /tmp/vtb/ && cp -r patches /tmp/vtb/vllm_transformers_backend/patches
export PYTHONPATH=/tmp/vtb:$PYTHONPATH
cp vllm_transformers_backend.pth "$(python3 -c 'import site; print(site.getsitepackages()[0])')/"
if [ -d /tmp/smolparts ] && [ ! -d /tmp/smol-bf16 ]; then cat /tmp/smolparts/smol.tar.* | tar xf - -C /tmp; fi
[ -d /tmp/smol-bf16 ] && export VTB_SMOLLM2=/tmp/smol-bf16
export VLLM_TRANSFORMERS_BACKEND_STRICT=1
# Ray (for the Ray-executor test), where a Ray site was unpacked to /tmp/raysite; last on the path.
if [ -d /tmp/raysite ]; then export PYTHONPATH=$PYTHONPATH:/tmp/raysite; fi
# The host's torchaudio is built for its own torch (2.11): transformers 5 imports it when it is found and fails
# with an undefined symbol under torch 2.4, so it is made unfindable (find_spec returns None) in every process.
echo "import sys; sys.modules.setdefault('torchaudio', None)" > "$(python3 -c 'import site; print(site.getsitepackages()[0])')/zz_vtb_no_torchaudio.pth"
