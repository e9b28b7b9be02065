"""What the throughput benchmark measures: model shapes, workloads, and random-weight checkpoints.

Checkpoints are written tensor by tensor (names and shapes from a meta-device HF model, values drawn on the
build device directly in the target dtype, saved in ~4 GiB safetensors shards), so an 8B shape needs
neither an fp32 copy nor the whole model in host memory at once.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Tuple

#: Model shapes (random weights: only speed and memory are measured); Llama unless ARCHITECTURE says otherwise.
#: The 1B and 8B shapes allow 16k positions so that the interleaved comparison's long-prompt workload (8192 in
#: plus 64 out) fits their max_model_len.
MODELS: Dict[str, Dict[str, Any]] = {
    "1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=16384),
    "8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=16384, rope_theta=500000.0),
    # Qwen2.5-0.5B's shape: q/k/v biases, tied head, head size 64 (runs on the CPU engine too)
    "qwen2": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                  num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                  rope_theta=1000000.0, rms_norm_eps=1e-6),
    # the CPU smoke test: head size 64 (what the CPU paged attention takes)
    "tiny": dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512),
    # Gemma 3 1B: five sliding-window layers (512) per full-attention one, 1 KV head of 256 (vLLM 0.6.2: no
    # native implementation; the backend applies the windows per layer)
    "gemma3-1b": dict(vocab_size=262144, hidden_size=1152, intermediate_size=6912, num_hidden_layers=26,
                      num_attention_heads=4, num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256,
                      sliding_window=512, max_position_embeddings=32768, rope_theta=1000000.0,
                      rope_local_base_freq=10000.0),
    # its CPU smoke test: head size 64, a 32-token window inside a 256-token context
    "gemma3-tiny": dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                        num_attention_heads=2, num_key_value_heads=1, head_dim=64, query_pre_attn_scalar=64,
                        sliding_window=32, sliding_window_pattern=2, max_position_embeddings=512),
    "tiny-qwen2": dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512),
    # mixture of experts: real models' layer shapes, fewer layers (a single GPU, minutes per checkpoint)
    # Mixtral-8x7B's layer: 8 experts of 14336, top-2; 4 layers (6.1B parameters)
    "mixtral-moe": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=4,
                        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096,
                        num_local_experts=8, num_experts_per_tok=2, sliding_window=None),
    # Qwen1.5-MoE-A2.7B's layer: 60 experts of 1408, top-4, a gated shared expert of 5632; 6 layers (4.0B)
    "qwen2-moe": dict(vocab_size=151936, hidden_size=2048, intermediate_size=5632, num_hidden_layers=6,
                      num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=4096,
                      num_experts=60, num_experts_per_tok=4, moe_intermediate_size=1408,
                      shared_expert_intermediate_size=5632, norm_topk_prob=False),
    # Qwen3-30B-A3B's layer: 128 experts of 768, top-8 renormalised, head size 128; 6 layers (4.3B)
    "qwen3-moe": dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=6,
                      num_attention_heads=32, num_key_value_heads=4, head_dim=128, max_position_embeddings=4096,
                      num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768, norm_topk_prob=True),
    # the CPU smoke test of the MoE path (HF's expert code there; native vLLM's MoE has no CPU path)
    "tiny-moe": dict(vocab_size=512, hidden_size=128, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                     num_local_experts=4, num_experts_per_tok=2, sliding_window=None),
    # the CPU smoke test of the Qwen3-MoE row (no native model: backend vs HF generate)
    "tiny-qwen3-moe": dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=512,
                           num_experts=8, num_experts_per_tok=2, moe_intermediate_size=64, norm_topk_prob=True),
}
#: (config class, model class, tie word embeddings, value of norm weights: Gemma scales by 1 + w)
ARCHITECTURES: Dict[str, tuple] = {"llama": ("LlamaConfig", "LlamaForCausalLM", False, 1.0),
                                   "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", True, 1.0),
                                   "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", True, 0.0),
                                   "mixtral": ("MixtralConfig", "MixtralForCausalLM", False, 1.0),
                                   "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", False, 1.0),
                                   "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", False, 1.0)}
ARCHITECTURE = {"gemma3-1b": "gemma3", "gemma3-tiny": "gemma3", "mixtral-moe": "mixtral", "tiny-moe": "mixtral",
                "qwen2-moe": "qwen2_moe", "qwen3-moe": "qwen3_moe", "tiny-qwen3-moe": "qwen3_moe", "qwen2": "qwen2", "tiny-qwen2": "qwen2"}
#: MoE architectures: per-expert checkpoint names (gate, up, down), and (5.x name, checkpoint name) of the block
#: where transformers 5 renamed it. Real checkpoints and vLLM's native loaders use these 4.x names; on 5.x the
#: meta model holds packed experts, written per expert here.
EXPERT_NAMES: Dict[str, tuple] = {"mixtral": (("w1", "w3", "w2"), (".mlp.", ".block_sparse_moe.")),
                                  "qwen2_moe": (("gate_proj", "up_proj", "down_proj"), None),
                                  "qwen3_moe": (("gate_proj", "up_proj", "down_proj"), None)}
MODEL_LABELS = {"1b": "Llama-1B shape", "8b": "Llama-8B shape", "tiny": "tiny Llama", "qwen2": "Qwen2-0.5B shape",
                "tiny-qwen2": "tiny Qwen2",
                "gemma3-1b": "Gemma-3-1B shape", "gemma3-tiny": "tiny Gemma 3",
                "mixtral-moe": "Mixtral-8x7B layers x4", "qwen2-moe": "Qwen1.5-MoE-A2.7B layers x6",
                "qwen3-moe": "Qwen3-30B-A3B layers x6", "tiny-moe": "tiny Mixtral",
                "tiny-qwen3-moe": "tiny Qwen3-MoE"}


def architecture(model: str) -> str:
    return ARCHITECTURE.get(model, "llama")


def model_class(model: str) -> str:
    """The HF class a shape's checkpoint declares (what native vLLM builds for it)."""
    return ARCHITECTURES[architecture(model)][1]


def hf_config(model: str, dtype: str) -> Any:
    """The shape's HF config, naming its model class in ``architectures`` (vLLM resolves the class from it)."""
    import transformers

    config_class, class_name, tied, _ = ARCHITECTURES[architecture(model)]
    config = getattr(transformers, config_class)(**MODELS[model], tie_word_embeddings=tied, torch_dtype=dtype)
    config.architectures = [class_name]
    return config


def config_checkpoint(model: str, dtype: str, root: Path) -> Path:
    """A checkpoint folder holding only the shape's config, under ``root``: what vLLM's ``load_format="dummy"``
    needs (it draws the weights itself)."""
    path = root / f"{model}-config"
    hf_config(model, dtype).save_pretrained(path)
    return path


@dataclass(frozen=True)
class Workload:
    name: str
    prompts: int
    input_len: int
    output_len: int

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


WORKLOADS: Dict[str, Workload] = {
    "decode": Workload("decode", 256, 128, 128),
    "prefill": Workload("prefill", 64, 1024, 32),
    # long context (engines with max_model_len 4096): most of each sequence lies outside a 512-token window
    "long": Workload("long", 32, 3840, 256),
}
#: What the interleaved comparison runs (benchmarks/interleaved.py), per device. GPU: the issue's four
#: workloads; CPU: the same kinds, sized for a few cores; smoke: every code path in seconds.
ROUND_WORKLOADS: Dict[str, Dict[str, Workload]] = {
    "gpu": {"decode": Workload("decode", 256, 128, 128), "prefill": Workload("prefill", 256, 1024, 32),
            "small": Workload("small", 8, 128, 128), "long": Workload("long", 4, 8192, 64),
            # issue #17's table also had 1024 sequences: four times --max-num-seqs, so decode steps of 256
            # with new prompts admitted as others finish; asked for by name (not in a default run)
            "decode1024": Workload("decode1024", 1024, 128, 128)},
    "cpu": {"decode": Workload("decode", 16, 32, 32), "prefill": Workload("prefill", 4, 256, 4),
            "small": Workload("small", 2, 32, 32)},
    "smoke": {"decode": Workload("decode", 4, 8, 6), "prefill": Workload("prefill", 2, 48, 2),
              "small": Workload("small", 1, 8, 6), "long": Workload("long", 1, 400, 4)},
}
#: What a run without --workloads takes from each table (the GPU's four fit one 10-minute command).
DEFAULT_ROUND_WORKLOADS: Dict[str, Tuple[str, ...]] = {
    table: tuple(name for name in names if name != "decode1024") for table, names in ROUND_WORKLOADS.items()}
#: Same names, CPU-sized: the smoke test exercises every code path in seconds.
TINY_WORKLOADS: Dict[str, Workload] = {
    "decode": Workload("decode", 8, 16, 8),
    "prefill": Workload("prefill", 4, 64, 4),
    "long": Workload("long", 4, 200, 16),
}

_MARKER = ".vtb-bench-checkpoint.json"
_SHARD_BYTES = 4 * 2 ** 30
_INIT_STD = 0.02
_FORMAT = 2  # bump when what build_checkpoint writes changes: older checkpoints are rebuilt


def checkpoint_ready(path: Path, model: str, dtype: str) -> bool:
    """True when ``path`` holds a complete checkpoint written by :func:`build_checkpoint` for this shape."""
    marker = path / _MARKER
    if not marker.is_file():
        return False
    return json.loads(marker.read_text()).get("fingerprint") == _fingerprint(model, dtype)


def _fingerprint(model: str, dtype: str) -> str:
    arch = [] if architecture(model) == "llama" else [architecture(model)]  # Llama fingerprints as before
    return hashlib.sha256(json.dumps([MODELS[model], dtype, _INIT_STD, _FORMAT, *arch]).encode()).hexdigest()[:16]


def _per_expert_shapes(arch: str, shapes: Dict[str, Tuple[int, ...]]) -> Dict[str, Tuple[int, ...]]:
    """``shapes`` with transformers 5's packed experts written per expert, under the names of EXPERT_NAMES."""
    import re

    names, block = EXPERT_NAMES.get(arch, (None, None))
    out: Dict[str, Tuple[int, ...]] = {}
    for name, shape in shapes.items():
        name = name.replace(*block) if block else name
        found = re.match(r"(.*\.experts)\.(gate_up_proj|down_proj)$", name)
        if not found or names is None:
            out[name] = shape
            continue
        experts, rows, cols = shape
        for e in range(experts):
            if found[2] == "gate_up_proj":
                out[f"{found[1]}.{e}.{names[0]}.weight"] = (rows // 2, cols)
                out[f"{found[1]}.{e}.{names[1]}.weight"] = (rows // 2, cols)
            else:
                out[f"{found[1]}.{e}.{names[2]}.weight"] = (rows, cols)
    return out


def build_checkpoint(model: str, path: Path, dtype: str, device: str, seed: int = 0) -> Dict[str, Any]:
    """Writes a random-weight checkpoint of shape ``model`` to ``path``: N(0, 0.02) matrices and biases, unit
    norm weights, ``dtype`` safetensors shards plus index. Returns what was written (bytes, seconds)."""
    import torch
    from safetensors.torch import save_file
    import transformers

    start = time.perf_counter()
    path.mkdir(parents=True, exist_ok=True)
    (path / _MARKER).unlink(missing_ok=True)  # incomplete until the end
    for stale in [*path.glob("*.safetensors"), path / "model.safetensors.index.json"]:
        stale.unlink(missing_ok=True)  # a shard left from another shape would be loaded too
    torch_dtype = getattr(torch, dtype)
    _, class_name, tied, norm_value = ARCHITECTURES[architecture(model)]
    config = hf_config(model, dtype)
    with torch.device("meta"):
        model_ = getattr(transformers, class_name)(config)
        shapes = {name: tuple(t.shape) for name, t in model_.state_dict().items()
                  if not (tied and name == "lm_head.weight")}
    shapes = _per_expert_shapes(architecture(model), shapes)
    itemsize = torch.empty((), dtype=torch_dtype).element_size()
    shards: List[List[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = itemsize * _numel(shape)
        if shards[-1] and size + nbytes > _SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    generator = torch.Generator(device=device).manual_seed(seed)
    weight_map, total = {}, 0
    for i, names in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" if len(shards) > 1 else "model.safetensors"
        tensors = {}
        for name in names:
            t = torch.empty(shapes[name], dtype=torch_dtype, device=device)
            if name.endswith("norm.weight"):
                t.fill_(norm_value)
            else:
                t.normal_(0.0, _INIT_STD, generator=generator)
            tensors[name] = t.cpu()
            weight_map[name] = file
            total += tensors[name].numel() * itemsize
        save_file(tensors, str(path / file), metadata={"format": "pt"})
        del tensors
        print(f"  wrote {file} ({i + 1}/{len(shards)})", flush=True)
    if len(shards) > 1:
        (path / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    config.save_pretrained(path)
    seconds = time.perf_counter() - start
    (path / _MARKER).write_text(json.dumps({"fingerprint": _fingerprint(model, dtype), "bytes": total,
                                            "seconds": seconds}))
    return {"bytes": total, "seconds": seconds, "shards": len(shards)}


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def make_prompts(workload: Workload, vocab_size: int, seed: int = 0) -> List[List[int]]:
    """The workload's prompts: random token ids (away from the special ids at the start of a vocabulary),
    the same for every implementation."""
    import random

    rng = random.Random(f"{seed}-{workload.name}")
    low, high = min(100, vocab_size // 4), vocab_size - 1
    return [[rng.randrange(low, high) for _ in range(workload.input_len)] for _ in range(workload.prompts)]
