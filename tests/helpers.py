"""Test helpers: tiny architectures, HF greedy references, vLLM engines run and torn down."""
from __future__ import annotations

import contextlib
import gc
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence

import torch

from vllm_transformers_backend.compat import INTERFACE_SINCE  # the backend's own table  # noqa: F401

MODELS_DIR = Path(os.environ.get("VTB_CACHE", Path.home() / ".cache/vllm-transformers-backend")) / "models"

#: Prompts as token ids (tiny random models have no tokenizer); mixed lengths.
PROMPTS: List[List[int]] = [
    [1, 5, 7, 9, 11, 13],
    [3, 4],
    [100, 200, 300, 400, 250, 6, 7, 8, 9, 10, 11],
    [42] * 20,
    [17, 300, 12, 11, 250, 499, 2, 3, 4],
]

_COMMON = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
               num_attention_heads=2, max_position_embeddings=512)


#: Extra config values every factory below applies last (set by :func:`config_overrides`; the shape sweep).
_OVERRIDES: Dict[str, Any] = {}


def _cfg(cls_name: str, **overrides: Any):
    import transformers

    return getattr(transformers, cls_name)(**{**_COMMON, **overrides, **_OVERRIDES})


@contextlib.contextmanager
def config_overrides(**values: Any) -> Iterator[None]:
    """``ARCHITECTURES[name][0]()`` inside this block builds the config with ``values`` on top."""
    previous = dict(_OVERRIDES)
    _OVERRIDES.update(values)
    try:
        yield
    finally:
        _OVERRIDES.clear()
        _OVERRIDES.update(previous)


#: name -> (config factory, whether vLLM 0.6.2 has a native implementation usable on the CPU)
ARCHITECTURES: Dict[str, tuple] = {
    # GQA, untied
    "llama": (lambda: _cfg("LlamaConfig", num_key_value_heads=1, tie_word_embeddings=False), True),
    # q/k/v biases, tied embeddings
    "qwen2": (lambda: _cfg("Qwen2Config", num_key_value_heads=1, tie_word_embeddings=True), True),
    # Gemma norms (1 + w), hidden-size normaliser, GeGLU, tied
    "gemma": (lambda: _cfg("GemmaConfig", num_key_value_heads=1, head_dim=64, hidden_activation="gelu_pytorch_tanh"), True),
    # final logit soft-cap, query_pre_attn_scalar scaling, interleaved sliding window (never reached)
    "gemma2": (lambda: _cfg("Gemma2Config", num_key_value_heads=1, head_dim=64, query_pre_attn_scalar=32,
                            final_logit_softcapping=5.0, attn_logit_softcapping=None, sliding_window=512,
                            hidden_act="gelu_pytorch_tanh",  # vLLM 0.6.2's Gemma2 still reads it
                            hidden_activation="gelu_pytorch_tanh"), True),
    # embed_scale inside the embedding module, q/k norms; no native vLLM 0.6.2 implementation
    "gemma3": (lambda: _cfg("Gemma3TextConfig", num_key_value_heads=1, head_dim=64, query_pre_attn_scalar=64,
                            sliding_window=512, final_logit_softcapping=None, attn_logit_softcapping=None), False),
    # GPT-2 Conv1D projections, learned positions, tied (vLLM's native GPT-2 crashes on this CPU build)
    "gpt2": (lambda: _cfg("GPT2Config", n_embd=128, n_layer=2, n_head=2, n_positions=512, vocab_size=512), False),
    # partial rotary (rotary_pct), untied embed_out, parallel residual (native crashes on this CPU build)
    "gpt_neox": (lambda: _cfg("GPTNeoXConfig", rotary_pct=0.25, tie_word_embeddings=False), False),
    # logit_scale, LayerNorm, tied
    "cohere": (lambda: _cfg("CohereConfig", num_key_value_heads=1, logit_scale=0.5), True),
    # logits_scaling (divides), embedding/residual/attention multipliers
    "granite": (lambda: _cfg("GraniteConfig", num_key_value_heads=1, logits_scaling=2.0, embedding_multiplier=3.0,
                             residual_multiplier=0.5, attention_multiplier=0.1, tie_word_embeddings=False), True),
    # q/k RMSNorms per head; no native vLLM 0.6.2 implementation
    "qwen3": (lambda: _cfg("Qwen3Config", num_key_value_heads=1, head_dim=64, tie_word_embeddings=True), False),
    # head_dim=None in the config (vLLM's get_head_size returned None)
    "mistral": (lambda: _cfg("MistralConfig", num_key_value_heads=1, head_dim=None, sliding_window=None), True),
    # full-width q/k RMSNorms; no native vLLM 0.6.2 implementation
    "olmo2": (lambda: _cfg("Olmo2Config", num_key_value_heads=1, tie_word_embeddings=False), False),
    # q pre-scaled by the module, attention called with scaling=1.0; learned positions offset by 2; tied
    "opt": (lambda: _cfg("OPTConfig", word_embed_proj_dim=128, ffn_dim=256), True),
}

#: Mixture-of-experts decoders (tests/test_moe.py; kept out of ARCHITECTURES: vLLM 0.6.2's native MoE models
#: cannot run on the CPU, and their suite has its own shapes). Shape keywords: experts, top_k, norm (the
#: ``norm_topk_prob`` flag; Mixtral always renormalises), inter (the experts' intermediate size).
MOE_ARCHITECTURES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")


def moe_config(name: str, experts: int = 4, top_k: int = 2, norm: bool = False, inter: int = 64,
               layers: int = 2, **overrides: Any):
    """A tiny MoE config (head size 64, one KV head) of architecture ``name``."""
    base = dict(vocab_size=512, hidden_size=128, num_hidden_layers=layers, num_attention_heads=2,
                num_key_value_heads=1, head_dim=64, max_position_embeddings=512, num_experts_per_tok=top_k)
    if name == "mixtral":
        return _cfg("MixtralConfig", **{**base, "intermediate_size": inter, "num_local_experts": experts,
                                        "sliding_window": None, **overrides})
    routed = dict(num_experts=experts, norm_topk_prob=norm)
    if name == "olmoe":
        return _cfg("OlmoeConfig", **{**base, **routed, "intermediate_size": inter, **overrides})
    cls = {"qwen2_moe": "Qwen2MoeConfig", "qwen3_moe": "Qwen3MoeConfig"}[name]
    extra = dict(shared_expert_intermediate_size=96) if name == "qwen2_moe" else {}
    return _cfg(cls, **{**base, **routed, **extra, "intermediate_size": 96, "moe_intermediate_size": inter,
                        **overrides})


def build_moe_checkpoint(name: str, path: Path, seed: int = 0, packed: bool = False, **shape: Any) -> Path:
    """Saves a tiny random MoE model (float32 safetensors) to ``path``: per-expert tensors as every release's
    ``save_pretrained`` writes them; ``packed``: transformers 5's packed ``experts.gate_up_proj``/``down_proj``
    (``save_original_format=False``; on 4.x stacked here from the per-expert tensors)."""
    import transformers

    config = moe_config(name, **shape)
    config.initializer_range = 0.1  # peaked logits: greedy ties between implementations are unlikely
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    if packed and transformers_version().major >= 5:
        model.save_pretrained(path, safe_serialization=True, save_original_format=False)
        return path
    model.save_pretrained(path, safe_serialization=True)
    if packed:
        pack_expert_tensors(path)
    return path


def pack_expert_tensors(path: Path) -> None:
    """Rewrites a per-expert checkpoint in transformers 5's packed layout (test-side: stacks the tensors)."""
    from safetensors.torch import load_file, save_file

    file = path / "model.safetensors"
    save_file(packed_experts(load_file(file)), file, metadata={"format": "pt"})


def packed_experts(tensors: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """``tensors`` with per-expert MoE tensors stacked into transformers 5's ``experts.gate_up_proj`` ``[E, 2I, H]``
    (each expert's gate rows, then its up rows) and ``experts.down_proj`` ``[E, H, I]`` (Mixtral's 4.x block
    ``block_sparse_moe`` named ``mlp`` as in 5.x)."""
    import re

    out, groups = {}, {}
    for key, value in tensors.items():
        found = re.match(r"(.*\.experts)\.(\d+)\.(w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$", key)
        if found:
            groups.setdefault(found[1], {}).setdefault(found[3], {})[int(found[2])] = value
        else:
            out[key] = value
    for prefix, parts in groups.items():
        gate, up, down = ("w1", "w3", "w2") if "w1" in parts else ("gate_proj", "up_proj", "down_proj")
        stack = lambda name: torch.stack([parts[name][e] for e in range(len(parts[name]))])  # noqa: E731
        prefix = prefix.replace(".block_sparse_moe.", ".mlp.")
        out[f"{prefix}.gate_up_proj"] = torch.cat([stack(gate), stack(up)], dim=1).contiguous()
        out[f"{prefix}.down_proj"] = stack(down).contiguous()
    return out


def per_expert_tensors(tensors: Dict[str, torch.Tensor], names=("gate_proj", "up_proj", "down_proj")
                       ) -> Dict[str, torch.Tensor]:
    """``tensors`` with transformers 5's packed experts cut into per-expert ``<experts>.<e>.<name>.weight``."""
    out = {}
    for key, value in tensors.items():
        if key.endswith(".experts.gate_up_proj"):
            prefix, inter = key[:-len(".gate_up_proj")], value.shape[1] // 2
            for e in range(value.shape[0]):
                out[f"{prefix}.{e}.{names[0]}.weight"] = value[e, :inter].clone()
                out[f"{prefix}.{e}.{names[1]}.weight"] = value[e, inter:].clone()
        elif key.endswith(".experts.down_proj"):
            prefix = key[:-len(".down_proj")]
            for e in range(value.shape[0]):
                out[f"{prefix}.{e}.{names[2]}.weight"] = value[e].clone()
        else:
            out[key] = value
    return out


#: The first transformers release that has the architecture at all.
INTRODUCED_IN = {"gemma3": "4.50.0", "qwen3": "4.51.0", "qwen3_moe": "4.51.0"}
#: INTERFACE_SINCE (imported above): the first release whose implementation of a model type sends attention
#: through ALL_ATTENTION_FUNCTIONS; before it the backend builds the type's SDPA classes with their SDPA call
#: routed (legacy_attention.py), except for the types in NOT_ROUTABLE, which must be refused with a clear error.
#: (model type, first release where routing works): a release before it has no SDPA class to route for the type.
#: (Found on the matrix's releases: GPT-NeoX 4.48 calls SDPA from a module-level function, ESM 4.48 has no SDPA class.)
NOT_ROUTABLE: Dict[str, str] = {"gpt_neox": "4.49.0", "esm": "4.56.0"}


def transformers_version():
    from packaging.version import Version
    import transformers

    return Version(Version(transformers.__version__).base_version)


def require_architecture(name: str) -> None:
    """Skips (with the reason) where the installed transformers does not have the architecture."""
    import pytest
    from packaging.version import Version

    since = INTRODUCED_IN.get(name)
    if since and transformers_version() < Version(since):
        pytest.skip(f"transformers {transformers_version()} has no {name} (added in {since})")


def routed_attention(name: str) -> bool:
    """Whether the installed transformers predates the attention interface for the architecture, so that the
    backend runs its routed SDPA classes (legacy_attention.py)."""
    from vllm_transformers_backend.compat import predates_interface

    return predates_interface(name)


def interface_supported(name: str) -> bool:
    """Whether the backend runs the architecture on the installed transformers: its attention goes through the
    interface, or the release predates that and the type's SDPA classes are routed (legacy_attention.py)."""
    from packaging.version import Version

    since = NOT_ROUTABLE.get(name)
    return not since or transformers_version() >= Version(since)

_CAUSAL_CLASS = {
    "gemma3": "Gemma3ForCausalLM", "gpt2": "GPT2LMHeadModel",
}


def build_checkpoint(name: str, path: Path, seed: int = 0) -> Path:
    """Saves a tiny random model of architecture ``name`` (float32 safetensors) to ``path``."""
    import transformers

    factory, _ = ARCHITECTURES[name]
    config = factory()
    config.initializer_range = 0.1  # peaked logits: greedy ties between implementations are unlikely
    torch.manual_seed(seed)
    cls_name = _CAUSAL_CLASS.get(name)
    model = (getattr(transformers, cls_name)(config) if cls_name
             else transformers.AutoModelForCausalLM.from_config(config)).eval()
    model.save_pretrained(path, safe_serialization=True)
    return path


def hf_greedy(path: Path, prompts: Sequence[Sequence[int]], max_tokens: int, trust_remote_code: bool = False,
              use_generate: bool = True) -> List[List[int]]:
    """Greedy continuations from HF in float32, one prompt at a time (no padding): ``generate``, or
    (``use_generate=False``, for models without cache support) argmax over full forwards."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32,
                                                              trust_remote_code=trust_remote_code).eval()
    model.generation_config.eos_token_id = None  # like ignore_eos: run every requested step
    outs = []
    with torch.no_grad():
        if not use_generate:
            for prompt in prompts:
                ids = list(prompt)
                for _ in range(max_tokens):
                    ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
                outs.append(ids[len(prompt):])
            return outs
        for prompt in prompts:
            ids = torch.tensor([list(prompt)])
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                                 do_sample=False, pad_token_id=0)
            outs.append(gen[0, ids.shape[1]:].tolist())
    return outs


def cleanup_engine() -> None:
    """Tears down vLLM's process-global state so that another engine can start in this process."""
    from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

    destroy_model_parallel()
    destroy_distributed_environment()
    gc.collect()


class Engine:
    """A CPU ``vllm.LLM`` for tests, always torn down (``with Engine(...) as llm``)."""

    def __init__(self, model: Path | str, model_impl: str = "transformers", **kwargs: Any) -> None:
        self.args = dict(model=str(model), model_impl=model_impl, device="cpu", dtype="float32",
                         skip_tokenizer_init=True, max_model_len=256, enforce_eager=True, seed=0)
        self.args.update(kwargs)
        self.llm = None

    def __enter__(self):
        from vllm import LLM

        try:
            self.llm = LLM(**self.args)
        except BaseException:
            # a failed start leaves vLLM's distributed state behind, which would break the next test
            cleanup_engine()
            raise
        return self.llm

    def __exit__(self, *exc) -> None:
        self.llm = None
        cleanup_engine()


def vllm_model(llm) -> torch.nn.Module:
    return llm.llm_engine.model_executor.driver_worker.model_runner.model


def vllm_greedy(llm, prompts: Sequence[Sequence[int]], max_tokens: int) -> List[List[int]]:
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def greedy(model: Path | str, model_impl: str, prompts, max_tokens: int, **kwargs: Any) -> List[List[int]]:
    with Engine(model, model_impl, **kwargs) as llm:
        return vllm_greedy(llm, prompts, max_tokens)


def bundled_model(name: str) -> Optional[Path]:
    path = MODELS_DIR / name
    return path if (path / ".prepared.json").is_file() else None


def write_json(path: Path, data: Dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def vllm_server(model: Path | str, args: Sequence[str], log_path: Path, ready_within: float = 240) -> Iterator[str]:
    """``vllm serve MODEL ARGS`` on a free local port, its output in ``log_path``; yields the base URL once
    ``/health`` answers and always stops the server (its whole process group)."""
    import pytest

    port = _free_port()
    vllm_cli = Path(sys.executable).parent / "vllm"
    # The GPU host runs vLLM from a staged site without console scripts: the same server as a module.
    command = ([str(vllm_cli), "serve", str(model)] if vllm_cli.is_file()
               else [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model)])
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [*command, "--host", "127.0.0.1", "--port", str(port), *args],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "VLLM_LOGGING_LEVEL": "INFO"},
            start_new_session=True,
        )
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.time() + ready_within
            while True:
                if process.poll() is not None:
                    pytest.fail(f"server exited with {process.returncode}: {log_path.read_text()[-3000:]}")
                try:
                    urllib.request.urlopen(f"{base}/health", timeout=2)
                    break
                except OSError:
                    if time.time() > deadline:
                        pytest.fail(f"server not ready within {ready_within} s")
                    time.sleep(1)
            yield base
        finally:
            os.killpg(process.pid, 15)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, 9)
