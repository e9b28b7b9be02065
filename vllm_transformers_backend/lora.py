"""LoRA adapters on the backend's layers, through vLLM 0.6.2's LoRA manager (CUDA GPUs only).

vLLM's LoRA manager (``vllm/lora/models.py``) wraps a model's layers by name. It reads, from the model
instance: ``supported_lora_modules`` (last name components of the layers to wrap), ``packed_modules_mapping``
(a fused layer -> the adapter's names for its shards), ``embedding_modules`` and ``embedding_padding_modules``
(the vocabulary layers and their extra LoRA tokens). vLLM's own models declare these on the class; the
backend's depend on the HF model, so the class declares empty ones (what vLLM's ``supports_lora`` check of
the class needs) and each instance gets its own, computed from the layers actually built
(:func:`lora_attributes`):

* each vLLM linear of the HF body under its HF name (``o_proj``, ``down_proj``, ``c_fc``), and each fused group
  under vLLM's name with its shards (``qkv_proj`` -> ``q_proj``/``k_proj``/``v_proj``, ``gate_up_proj`` ->
  ``gate_proj``/``up_proj``), so PEFT adapters trained on the HF model load as they do for vLLM's Llama;
  a name is declared only when every layer carrying it can take a LoRA layer;
* the input embedding and ``lm_head``, with vLLM's extra LoRA vocabulary, as vLLM's Llama has them, for
  untied models whose embedding is a plain vocabulary embedding and whose head HF calls ``lm_head``
  (:func:`vocabulary_lora`). Tied heads (they share the embedding's rows) and scaled embeddings get none.

Adapter tensors are matched by full module name, ``model.`` + the HF body's names, so the HF model must keep
its body under ``model`` (Llama, Qwen2, Mistral, Gemma, ...); other layouts are refused at load.

vLLM picks a LoRA layer by the exact class of the layer it wraps (``type(layer) is RowParallelLinear``) and
its LoRA layers return ``(output, bias)``; the backend's linears are subclasses that return the tensor HF
expects. :func:`lora_layer_for` gives each of them vLLM's LoRA layer with the same tensor output; the
``lora_layers`` patch makes vLLM's ``from_layer`` use it. Fused layers are vLLM's own classes and get
vLLM's own LoRA layers (their slices unpack the tuple).

Decode step: with adapters loaded, vLLM's LoRA layers stand in for the backend's linears (each adds its
adapter's product to the layer's output); everything here runs at load.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

from torch import nn

from .layers import (HFColumnParallelLinear, HFPackedColumnParallelLinear, HFReplicatedLinear, HFRowParallelLinear,
                     TensorOutput)

#: The name vLLM's LoRA manager gives the LM head (it then wraps the model's ``logits_processor``).
LM_HEAD = "lm_head"

#: vLLM LoRA class -> the same class returning the output tensor alone (made once each).
_TENSOR_OUTPUT_CLASSES: Dict[type, type] = {}


def _tensor_output_lora_class(lora_cls: type) -> type:
    if lora_cls not in _TENSOR_OUTPUT_CLASSES:
        _TENSOR_OUTPUT_CLASSES[lora_cls] = type(f"HF{lora_cls.__name__}", (TensorOutput, lora_cls), {
            "__doc__": f"vLLM's {lora_cls.__name__} returning the output tensor alone (what HF modules expect)."})
    return _TENSOR_OUTPUT_CLASSES[lora_cls]


def _vllm_lora_class(layer: nn.Module, fully_sharded: bool, tp_size: int) -> Optional[type]:
    """vLLM's LoRA class for one of the backend's linears, by the vLLM class it extends (None: no LoRA)."""
    from vllm.lora.fully_sharded_layers import ColumnParallelLinearWithShardedLoRA, RowParallelLinearWithShardedLoRA
    from vllm.lora.layers import ColumnParallelLinearWithLoRA, ReplicatedLinearWithLoRA, RowParallelLinearWithLoRA

    kind = type(layer)
    # A packed [gate; up] linear keeps each half's rows per rank: vLLM's column LoRA slices B contiguously,
    # which is right only without sharding. K/V heads replicated over ranks (HFKVHeadColumnParallelLinear)
    # would need B sliced by head: no LoRA for them.
    if kind is HFColumnParallelLinear or (kind is HFPackedColumnParallelLinear and tp_size == 1):
        return ColumnParallelLinearWithShardedLoRA if fully_sharded else ColumnParallelLinearWithLoRA
    if kind is HFRowParallelLinear:
        return RowParallelLinearWithShardedLoRA if fully_sharded else RowParallelLinearWithLoRA
    if kind is HFReplicatedLinear:
        return ReplicatedLinearWithLoRA  # a replicated layer needs no sharding, fully sharded LoRA or not
    return None


def check_supported(lora_config: Any, body_name: str, model_name: str) -> Optional[str]:
    """Why LoRA cannot run on this backend model (None: it can)."""
    from .runtime import patch_applied

    if not patch_applied("lora_layers")[0]:
        return ("the lora_layers patch of vLLM is not applied (see `python -m vllm_transformers_backend doctor`); "
                "without it vLLM's LoRA manager cannot wrap the backend's linears")
    if body_name != "model":
        return (f"LoRA adapters name {model_name}'s modules from its base model "
                f"({body_name + '.' if body_name else ''}...), and vLLM's LoRA manager matches them against the "
                "backend's names, which keep the HF body under 'model.': only models whose base model attribute is "
                "'model' (Llama, Qwen2, Mistral, Gemma, ...) take LoRA adapters on the Transformers backend")
    if getattr(lora_config, "long_lora_scaling_factors", None):
        return ("long-context LoRA (long_lora_scaling_factors) replaces vLLM's rotary embedding layer, which the "
                "Transformers backend does not use (HF computes the rotation)")
    return None


def lora_layer_for(layer: nn.Module, lora_config: Any) -> Optional[type]:
    """The LoRA layer class for one of the backend's own linear classes (None: not one of them)."""
    from vllm.distributed import get_tensor_model_parallel_world_size

    lora_cls = _vllm_lora_class(layer, bool(lora_config.fully_sharded_loras), get_tensor_model_parallel_world_size())
    return None if lora_cls is None else _tensor_output_lora_class(lora_cls)


def vocabulary_lora(lora_config: Any, tied: bool, input_embedding: Optional[nn.Module],
                    output_embedding_names: List[str]) -> bool:
    """Whether the input embedding and the LM head take LoRA (and vLLM's extra LoRA vocabulary)."""
    if lora_config is None or tied or input_embedding is None or output_embedding_names != [LM_HEAD]:
        return False
    # HF embeddings that scale their output (Gemma 3's embed_scale) become a ScaledVocabParallelEmbedding,
    # which vLLM's embedding LoRA does not wrap.
    return getattr(input_embedding, "embed_scale", None) is None and isinstance(input_embedding, nn.Embedding)


def extra_vocab_rows(lora_config: Any) -> Tuple[int, int]:
    """Extra rows of the input embedding and of the LM head for LoRA tokens, as vLLM's Llama sizes them."""
    extra = lora_config.lora_extra_vocab_size
    return extra * (lora_config.max_loras or 1), extra


def _can_take_lora(module: nn.Module, packed: Dict[str, List[str]], name: str, tp_size: int) -> bool:
    from vllm.model_executor.layers.linear import (ColumnParallelLinear, MergedColumnParallelLinear,
                                                   QKVParallelLinear, ReplicatedLinear, RowParallelLinear)

    kind = type(module)
    if kind is QKVParallelLinear:
        return len(packed.get(name, ())) in (1, 3)
    if kind is MergedColumnParallelLinear:
        return len(packed.get(name, ())) in (1, 2)
    if kind in (ColumnParallelLinear, RowParallelLinear, ReplicatedLinear):
        return True
    return _vllm_lora_class(module, False, tp_size) is not None


def lora_attributes(model: nn.Module, body_name: str, packed: Dict[str, List[str]], tp_size: int,
                    vocabulary: Optional[str]) -> Tuple[Dict[str, Any], List[str]]:
    """The LoRA attributes of one backend model (see the module docstring), and the linears' names that
    cannot take LoRA (adapters naming them are refused by vLLM's adapter check).

    ``body_name``: the attribute holding the HF body; ``packed``: fused name -> shard names (fusion.py);
    ``vocabulary``: the input embedding's name when the vocabulary layers take LoRA (None otherwise).
    """
    from vllm.model_executor.layers.linear import LinearBase

    # vLLM wraps every module whose name ends in a declared name, whatever it is (a fused slice called
    # q_proj too): a name is declared only when all its modules can take a LoRA layer.
    by_name: Dict[str, List[nn.Module]] = {}
    for name, module in getattr(model, body_name).named_modules():
        by_name.setdefault(name.rpartition(".")[2], []).append(module)
    linear_names = {name for name, modules in by_name.items() if any(isinstance(m, LinearBase) for m in modules)}
    capable = {name for name in linear_names
               if all(_can_take_lora(m, packed, name, tp_size) for m in by_name[name])}
    supported = sorted(capable)
    embedding_modules: Dict[str, str] = {}
    padding: List[str] = []
    if vocabulary is not None:
        supported += [vocabulary, LM_HEAD]
        embedding_modules = {vocabulary: "input_embeddings", LM_HEAD: "output_embeddings"}
        padding = [LM_HEAD]
    attributes = {
        "supported_lora_modules": supported,
        "packed_modules_mapping": {name: list(shards) for name, shards in packed.items() if name in capable},
        "embedding_modules": embedding_modules,
        "embedding_padding_modules": padding,
    }
    return attributes, sorted(linear_names - capable)
