"""Tiny quantized checkpoints and PEFT LoRA adapters, written by the tests themselves (no hub).

A float checkpoint (``helpers.build_checkpoint``) is rewritten with the linears of its decoder layers in a
quantization method's on-disk format and its ``quantization_config`` in ``config.json``:

* ``gptq``: AutoGPTQ's format, 4 bits, symmetric. ``qweight`` int32 ``[in/8, out]`` (8 values packed along the
  input), ``qzeros`` int32 ``[groups, out/8]`` (zero point minus one, packed along the output), ``scales``
  float16 ``[groups, out]``, ``g_idx`` int32 ``[in]`` (each input channel's group: ``i // group_size``, or
  with ``desc_act`` a permutation, shared by the projections of one input as GPTQ's act order makes it), and
  a zero ``bias`` for each linear without one (AutoGPTQ writes them);
* ``awq``: AutoAWQ's GEMM format, 4 bits with zero points. ``qweight`` int32 ``[in, out/8]`` and ``qzeros``
  int32 ``[groups, out/8]`` packed along the output in AWQ's order (0, 2, 4, 6, 1, 3, 5, 7), ``scales``
  float16 ``[groups, out]``;
* ``fp8``: vLLM's FP8 format (AutoFP8): ``weight`` float8_e4m3fn with per-tensor scalar ``weight_scale`` and
  static ``input_scale`` (activation maxima measured on the prompts / 448), ``quant_method: fp8``;
* ``compressed-tensors``: llm-compressor's W8A8 FP8 (``float-quantized``), the same tensors with ``[1]``
  scales and ``config_groups`` targeting ``Linear``, ``lm_head`` ignored.

Each function also returns the dequantized weights, from which :func:`write_dequantized` writes a float
checkpoint (what the quantized model computes, up to the kernels' rounding).

LoRA adapters are PEFT's format: ``adapter_config.json`` and ``adapter_model.safetensors`` with
``base_model.model.<module>.lora_A.weight`` ``[r, in]`` / ``lora_B.weight`` ``[out, r]`` (embeddings:
``lora_embedding_A`` ``[r, vocab]`` / ``lora_embedding_B`` ``[hidden, r]``), random.
"""
from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

FP8_MAX = 448.0  # largest float8_e4m3fn value
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble k of a packed AWQ int holds column AWQ_ORDER[k] of its 8


def _pack_int4(values: torch.Tensor, dim: int, order: Sequence[int] = tuple(range(8))) -> torch.Tensor:
    """Packs 4-bit values (0..15) eight to an int32 along ``dim``: nibble k holds element ``order[k]`` of
    each run of eight."""
    v = values.to(torch.int64).movedim(dim, -1).numpy().astype(np.uint32)
    runs = v.reshape(*v.shape[:-1], v.shape[-1] // 8, 8)
    packed = np.zeros(runs.shape[:-1], dtype=np.uint32)
    for k, column in enumerate(order):
        packed |= (runs[..., column] & 0xF) << np.uint32(4 * k)
    return torch.from_numpy(packed.view(np.int32)).movedim(-1, dim).contiguous()


def gptq_quantize(weight: torch.Tensor, group_size: int, perm: Optional[torch.Tensor] = None
                  ) -> Tuple[Dict[str, torch.Tensor], torch.Tensor]:
    """GPTQ tensors of one ``[out, in]`` weight (``perm``: act order, the input channels in quantization
    order) and the dequantized weight."""
    out_f, in_f = weight.shape
    order = perm if perm is not None else torch.arange(in_f)
    g_idx = torch.empty(in_f, dtype=torch.int32)
    g_idx[order] = (torch.arange(in_f) // group_size).to(torch.int32)
    w = weight.t().float()  # [in, out]
    groups = in_f // group_size
    scales = torch.zeros(groups, out_f)
    for group in range(groups):
        rows = g_idx == group
        scales[group] = w[rows].abs().amax(dim=0).clamp(min=1e-6) / 7.0
    scales = scales.half()  # stored as float16: dequantize with exactly these
    s = scales.float()[g_idx.long()]  # [in, out]
    q = torch.clamp(torch.round(w / s) + 8, 0, 15).to(torch.int32)
    dequant = (s * (q - 8).float()).t().contiguous()
    tensors = {
        "qweight": _pack_int4(q, dim=0),
        "qzeros": _pack_int4(torch.full((groups, out_f), 8 - 1, dtype=torch.int32), dim=1),
        "scales": scales,
        "g_idx": g_idx,
    }
    return tensors, dequant


def awq_quantize(weight: torch.Tensor, group_size: int) -> Tuple[Dict[str, torch.Tensor], torch.Tensor]:
    """AWQ (GEMM) tensors of one ``[out, in]`` weight and the dequantized weight."""
    out_f, in_f = weight.shape
    w = weight.t().float().reshape(in_f // group_size, group_size, out_f)
    low, high = w.amin(dim=1), w.amax(dim=1)  # [groups, out]
    scales = ((high - low).clamp(min=1e-6) / 15.0).half()
    s = scales.float()
    zeros = torch.clamp(torch.round(-low / s), 0, 15).to(torch.int32)
    q = torch.clamp(torch.round(w / s[:, None]) + zeros[:, None], 0, 15).to(torch.int32)
    dequant = ((q - zeros[:, None]).float() * s[:, None]).reshape(in_f, out_f).t().contiguous()
    tensors = {
        "qweight": _pack_int4(q.reshape(in_f, out_f), dim=1, order=AWQ_ORDER),
        "qzeros": _pack_int4(zeros, dim=1, order=AWQ_ORDER),
        "scales": scales,
    }
    return tensors, dequant


def fp8_quantize(weight: torch.Tensor, input_absmax: float, scale_shape: Tuple[int, ...]
                 ) -> Tuple[Dict[str, torch.Tensor], torch.Tensor]:
    """Per-tensor FP8 weight, weight scale and static input scale; the dequantized weight."""
    scale = weight.abs().max().float().clamp(min=1e-12) / FP8_MAX
    q = (weight.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    tensors = {
        "weight": q,
        "weight_scale": scale.reshape(scale_shape),
        "input_scale": torch.tensor(max(input_absmax, 1e-6) / FP8_MAX, dtype=torch.float32).reshape(scale_shape),
    }
    return tensors, (q.float() * scale).contiguous()


def _decoder_linears(model: torch.nn.Module) -> Dict[str, torch.nn.Linear]:
    """The ``nn.Linear`` modules of the decoder layers (not the LM head), by checkpoint module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in name}


def _input_absmax(model: torch.nn.Module, linears: Dict[str, torch.nn.Module],
                  prompts: Sequence[Sequence[int]]) -> Dict[str, float]:
    seen: Dict[str, float] = {name: 0.0 for name in linears}
    hooks = [module.register_forward_pre_hook(
        lambda m, args, name=name: seen.__setitem__(name, max(seen[name], float(args[0].abs().max()))))
        for name, module in linears.items()]
    try:
        with torch.no_grad():
            for prompt in prompts:
                model(input_ids=torch.tensor([list(prompt)]))
    finally:
        for hook in hooks:
            hook.remove()
    return seen


def _act_order_perms(linears: Dict[str, torch.nn.Linear], seed: int) -> Dict[str, torch.Tensor]:
    """One input-channel permutation per (parent module, input size): GPTQ's act order follows the input's
    Hessian, which the projections reading one input (q/k/v, gate/up) share."""
    generator = torch.Generator().manual_seed(seed)
    perms: Dict[Tuple[str, int], torch.Tensor] = {}
    out = {}
    for name, module in linears.items():
        key = (name.rpartition(".")[0], module.in_features)
        if key not in perms:
            perms[key] = torch.randperm(module.in_features, generator=generator)
        out[name] = perms[key]
    return out


QUANT_CONFIGS = {
    "gptq": lambda group_size, desc_act: {"quant_method": "gptq", "bits": 4, "group_size": group_size,
                                          "desc_act": desc_act, "sym": True, "lm_head": False,
                                          "checkpoint_format": "gptq"},
    "awq": lambda group_size, desc_act: {"quant_method": "awq", "bits": 4, "group_size": group_size,
                                         "zero_point": True, "version": "gemm"},
    "fp8": lambda group_size, desc_act: {"quant_method": "fp8", "activation_scheme": "static"},
    "compressed-tensors": lambda group_size, desc_act: {
        "quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
        "ignore": ["lm_head"],
        "config_groups": {"group_0": {
            "targets": ["Linear"],
            "weights": {"num_bits": 8, "type": "float", "strategy": "tensor", "symmetric": True, "dynamic": False},
            "input_activations": {"num_bits": 8, "type": "float", "strategy": "tensor", "symmetric": True,
                                  "dynamic": False},
        }},
    },
}


def quantize_checkpoint(src: Path, dst: Path, method: str, *, group_size: int = 64, desc_act: bool = False,
                        prompts: Sequence[Sequence[int]] = ((1, 2, 3, 4, 5, 6, 7, 8),), seed: int = 0
                        ) -> Dict[str, torch.Tensor]:
    """Writes ``dst``: the float checkpoint ``src`` with its decoder linears in ``method``'s format (see the
    module docstring). Returns the dequantized weights by checkpoint name (``...q_proj.weight``)."""
    import transformers
    from safetensors.torch import save_file

    model = transformers.AutoModelForCausalLM.from_pretrained(src, torch_dtype=torch.float32).eval()
    linears = _decoder_linears(model)
    absmax = _input_absmax(model, linears, prompts) if method in ("fp8", "compressed-tensors") else {}
    perms = _act_order_perms(linears, seed) if desc_act else {}
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    dequantized: Dict[str, torch.Tensor] = {}
    for name, module in linears.items():
        weight = state.pop(f"{name}.weight")
        if method == "gptq":
            tensors, dequant = gptq_quantize(weight, group_size, perms.get(name))
            if module.bias is None:
                tensors["bias"] = torch.zeros(module.out_features, dtype=torch.float16)  # AutoGPTQ writes one
        elif method == "awq":
            tensors, dequant = awq_quantize(weight, group_size)
        elif method in ("fp8", "compressed-tensors"):
            tensors, dequant = fp8_quantize(weight, absmax[name], () if method == "fp8" else (1,))
        else:
            raise ValueError(f"unknown method {method!r}")
        state.update({f"{name}.{key}": value for key, value in tensors.items()})
        dequantized[f"{name}.weight"] = dequant
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((dst / "config.json").read_text())
    config["quantization_config"] = QUANT_CONFIGS[method](group_size, desc_act)
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return dequantized


def write_dequantized(src: Path, dst: Path, dequantized: Dict[str, torch.Tensor]) -> Path:
    """The float checkpoint ``src`` with the dequantized weights in place of its linears'."""
    from safetensors.torch import load_file, save_file

    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    state = load_file(str(src / "model.safetensors"))
    state.update(dequantized)
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def write_word_tokenizer(path: Path, vocab_size: int) -> Path:
    """A word-level tokenizer ("t0 t1 ...") for a random checkpoint, so that `vllm serve` has one (the
    tests send token ids)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel(vocab={f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="t0", bos_token="t1",
                            eos_token="t2").save_pretrained(str(path))
    return path


def write_lora_adapter(base: Path, dst: Path, targets: Sequence[str], *, rank: int = 8, alpha: int = 16,
                       seed: int = 0, scale: float = 0.05) -> Path:
    """A random PEFT LoRA adapter for the HF model at ``base`` on the modules whose last name is in
    ``targets`` (linears, and ``embed_tokens``/``lm_head`` as embedding/linear LoRA)."""
    import transformers
    from safetensors.torch import save_file

    config = transformers.AutoConfig.from_pretrained(base)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=generator) * scale).contiguous()

    tensors: Dict[str, torch.Tensor] = {}
    found: List[str] = []
    for name, module in model.named_modules():
        last = name.rpartition(".")[2]
        if last not in targets:
            continue
        key = f"base_model.model.{name}"
        if isinstance(module, torch.nn.Embedding):
            tensors[f"{key}.lora_embedding_A"] = rand(rank, module.num_embeddings)
            tensors[f"{key}.lora_embedding_B"] = rand(module.embedding_dim, rank)
        elif isinstance(module, torch.nn.Linear):
            tensors[f"{key}.lora_A.weight"] = rand(rank, module.in_features)
            tensors[f"{key}.lora_B.weight"] = rand(module.out_features, rank)
        else:
            continue
        found.append(last)
    missing = set(targets) - set(found)
    if missing:
        raise ValueError(f"{base}: no modules named {sorted(missing)}")
    dst.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(dst / "adapter_model.safetensors"), metadata={"format": "pt"})
    adapter_config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base),
                      "r": rank, "lora_alpha": alpha, "lora_dropout": 0.0, "bias": "none",
                      "target_modules": sorted(set(found)), "fan_in_fan_out": False, "inference_mode": True}
    (dst / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))
    return dst


# --- models built from such checkpoints without an engine (CPU tests) ---------------------------------


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("cpu"):
            yield
    finally:
        torch.set_default_dtype(previous)


def _configs(path: Path, dtype: torch.dtype, quantization=None):
    """vLLM's ModelConfig and the quant_config its loader would build (vLLM's own reader of the checkpoint's
    ``quantization_config``; no device capability or dtype check: nothing runs)."""
    from vllm.config import LoadConfig, ModelConfig
    from vllm.model_executor.model_loader.weight_utils import get_quant_config

    model_config = ModelConfig(model=str(path), tokenizer=str(path), tokenizer_mode="auto", trust_remote_code=False,
                               dtype=dtype, seed=0, max_model_len=256, skip_tokenizer_init=True,
                               quantization=quantization, model_impl="transformers")
    quant_config = get_quant_config(model_config, LoadConfig()) if model_config.quantization else None
    return model_config, quant_config


def build_model(path: Path, dtype: torch.dtype, native: str = "", quantization=None, lora_config=None, load: bool = True):
    """The backend's model (``native=""``) or vLLM's ``native`` class (e.g. ``LlamaForCausalLM``), built on the
    CPU in ``dtype`` with the ``quant_config`` vLLM's loader would build and ``lora_config``, without an engine
    (needs vLLM's distributed state: the ``one_process_group`` fixtures); weights loaded unless ``load=False``."""
    import vllm.model_executor.models as models
    from vllm.config import CacheConfig
    from vllm.model_executor.model_loader.weight_utils import safetensors_weights_iterator

    from vllm_transformers_backend.causal import TransformersForCausalLM
    from vllm_transformers_backend.config import BackendConfig, backend_config_scope

    model_config, quant_config = _configs(path, dtype, quantization)
    extra = {"lora_config": lora_config} if lora_config is not None else {}
    with _default_dtype(dtype):
        if native:
            native_cls, _ = models.ModelRegistry.resolve_model_cls([native])
            # vLLM's Qwen2 reads the cache config's sliding window
            cache_config = CacheConfig(block_size=16, gpu_memory_utilization=0.9, swap_space=0, cache_dtype="auto")
            model = native_cls(config=model_config.hf_config, cache_config=cache_config, quant_config=quant_config,
                               **extra)
        else:
            with backend_config_scope(BackendConfig(model_config=model_config)):
                model = TransformersForCausalLM(config=model_config.hf_config, quant_config=quant_config, **extra)
    if load:
        model.load_weights(safetensors_weights_iterator([str(path / "model.safetensors")]))
    return model
