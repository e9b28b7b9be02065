"""``Base``: an HF ``transformers`` model running inside vLLM 0.6.2's engine.

Construction (inside vLLM's loader, under ``with torch.device(target)`` and the model dtype):

1. build the HF model from its config with parameters on the meta device (buffers such as rotary
   ``inv_freq`` are computed for real, on the target device);
2. swap ``nn.Linear``/``Conv1D`` for vLLM linears (by ``tp_plan`` style), RMSNorms for vLLM's, the
   input embedding for ``VocabParallelEmbedding`` (keeping ``embed_scale``);
3. create one vLLM ``Attention`` per layer, reached from the ``"vllm"`` attention function;
4. allocate what is still on meta on the target device; weights come later through ``load_weights``.
"""
from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterable, Iterator, List, Optional, Tuple

import torch
from torch import nn

from vllm.attention import Attention, AttentionMetadata
from vllm.distributed import get_tensor_model_parallel_world_size

from . import compat, devices
from ._logging import get_logger
from .attention import ATTN_IMPLEMENTATION, AttentionContext, attention_context, register_attention_function
from .config import BackendConfig, current_backend_config
from .layers import make_embedding, make_linear, make_rms_norm, plan_regexes, rms_norm_form
from .weights import (WeightsMapper, add_checkpoint_transforms, computed_buffer_ignores, legacy_renames,
                      load_weights)

logger = get_logger(__name__)


class BackendError(ValueError):
    """The model cannot run on the Transformers backend (the message says why and what to do)."""


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Parameters are created on the meta device, buffers where the ambient device says."""
    original = nn.Module.register_parameter

    def register_parameter(module: nn.Module, name: str, param: Optional[nn.Parameter]) -> None:
        original(module, name, param)
        if param is not None and not param.is_meta:
            kwargs = dict(param.__dict__)
            module._parameters[name] = type(param)(param.to("meta"), **kwargs) if kwargs else \
                nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register_parameter  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and module.weight.dim() == 2


class Base(nn.Module):
    """Shared by the causal and pooling wrappers: the HF model, its swapped layers, its attention."""

    #: The HF auto class the wrapper builds (the causal wrapper builds ``AutoModelForCausalLM``).
    hf_auto_class = "AutoModel"

    def __init__(
        self,
        config: Any,
        cache_config: Any = None,
        quant_config: Any = None,
        lora_config: Any = None,
        **_: Any,
    ) -> None:
        super().__init__()
        from vllm_transformers_backend.patches import ensure_applied

        ensure_applied()
        compat.check_transformers()
        bundle = current_backend_config()
        if bundle is None:
            raise BackendError(
                f"{type(self).__name__} must be built by vLLM's model loader (the model_loader patch hands it "
                "the ModelConfig); construct it through vllm.LLM(..., model_impl='transformers')."
            )
        if lora_config is not None:
            raise BackendError("LoRA is not supported by the Transformers backend on vLLM 0.6.2 yet.")
        register_attention_function()

        self.bundle: BackendConfig = bundle
        self.config = config
        self.text_config = compat.get_text_config(config)
        self.cache_config = cache_config
        self.quant_config = quant_config
        self.device = devices.current_device()
        self.dtype = torch.get_default_dtype()
        self.tp_size = get_tensor_model_parallel_world_size()
        self.start_layer = 0
        self._dispatch_verified = False

        hf_model = self._build_hf_model()
        self.hf_model_class = type(hf_model)
        self._output_embedding_names = self._output_embedding_qualnames(hf_model)
        self._checkpoint_transforms = compat.checkpoint_transforms(hf_model)
        self._checkpoint_prefix, self.model = self._base_model_of(hf_model)
        self._check_attention_backend_support(hf_model)
        self._replace_modules()
        self.attention_instances: Dict[int, Attention] = self._create_attention_instances()
        self._post_init(hf_model)
        self._materialize_parameters()
        logger.info("Transformers backend: %s (HF %s) on %s, %d attention layers of head size %d",
                    type(self).__name__, type(self.model).__name__, self.device, len(self.attention_instances),
                    self.bundle.model_config.get_head_size())

    # --- construction -----------------------------------------------------------------------------

    def _build_hf_model(self) -> nn.Module:
        import transformers

        auto_class = getattr(transformers, self.hf_auto_class)
        trust = self.bundle.trust_remote_code
        self.text_config._attn_implementation = ATTN_IMPLEMENTATION
        # transformers builds in config.dtype; vLLM has already chosen the dtype (the ambient default).
        for cfg in {id(self.config): self.config, id(self.text_config): self.text_config}.values():
            compat.set_config_dtype(cfg, self.dtype)
        try:
            return self._from_config(auto_class, self.config, trust)
        except ValueError as exc:
            if "Unrecognized configuration class" not in str(exc):
                raise
        # vLLM 0.6.2 loads some configs with classes of its own (Granite, ...) that transformers' auto
        # classes do not know: build from transformers' own class for the same model_type.
        config = compat.transformers_config(self.config)
        config._attn_implementation = ATTN_IMPLEMENTATION
        return self._from_config(auto_class, config, trust)

    def _from_config(self, auto_class: Any, config: Any, trust_remote_code: bool) -> nn.Module:
        with parameters_on_meta():
            try:
                return auto_class.from_config(
                    config,
                    trust_remote_code=trust_remote_code,
                    attn_implementation=ATTN_IMPLEMENTATION,
                    **compat.dtype_kwargs(self.dtype),
                )
            except KeyError as exc:
                # transformers < 4.49 models that pick attention classes from a dict keyed by name
                if exc.args == (ATTN_IMPLEMENTATION,):
                    raise BackendError(self._no_attention_interface_message(
                        "its attention classes are looked up by implementation name")) from exc
                raise
            except ValueError as exc:
                message = str(exc)
                if "Unrecognized configuration class" not in message and (
                        "attn_implementation" in message or "attention" in message.lower()):
                    raise BackendError(self._no_attention_interface_message(exc)) from exc
                raise

    def _no_attention_interface_message(self, detail: object) -> str:
        arch = (getattr(self.config, "architectures", None) or [type(self.config).__name__])[0]
        return (
            f"{arch} does not support the Transformers attention interface in transformers "
            f"{compat.transformers_version()} ({detail}). The backend needs a model whose attention modules "
            "call ALL_ATTENTION_FUNCTIONS[config._attn_implementation], carry `layer_idx`, pass **kwargs down, "
            "and whose class sets `_supports_attention_backend = True`. Fix: upgrade transformers, adapt the "
            "custom modeling code, or use model_impl='vllm' if vLLM has the architecture."
        )

    def _check_attention_backend_support(self, hf_model: nn.Module) -> None:
        # transformers >= 4.50 declares the flag; False means the modeling code bypasses the interface.
        flag = getattr(type(hf_model), "_supports_attention_backend", None)
        if flag is False:
            raise BackendError(self._no_attention_interface_message("_supports_attention_backend is False"))

    @staticmethod
    def _base_model_of(hf_model: nn.Module) -> Tuple[str, nn.Module]:
        """The body the wrapper calls and the attribute name it has in HF checkpoints."""
        prefix = getattr(hf_model, "base_model_prefix", "")
        body = getattr(hf_model, prefix, None) if prefix else None
        if body is None:
            getter = getattr(hf_model, "get_decoder", None)
            body = getter() if callable(getter) else None
        if body is None or body is hf_model:
            return "", hf_model
        name = next((n for n, child in hf_model.named_children() if child is body), prefix)
        return name, body

    @staticmethod
    def _output_embedding_qualnames(hf_model: nn.Module) -> List[str]:
        getter = getattr(hf_model, "get_output_embeddings", None)
        head = getter() if callable(getter) else None
        if head is None:
            return []
        return [name for name, module in hf_model.named_modules() if module is head]

    def _tp_plan(self) -> Dict[str, str]:
        plan: Dict[str, str] = {}
        plan.update(getattr(self.text_config, "base_model_tp_plan", None) or {})
        plan.update(getattr(self.model, "_tp_plan", None) or {})
        return plan

    def _replace_modules(self) -> None:
        plan = self._tp_plan()
        if self.tp_size > 1 and not plan:
            raise BackendError(
                f"{type(self.model).__name__} has no tp_plan, so it cannot be sharded over "
                f"{self.tp_size} ranks. Add `base_model_tp_plan` to its config (or `_tp_plan` to the model "
                "class), mapping each linear's name pattern to 'colwise'/'rowwise', or run with "
                "tensor_parallel_size=1."
            )
        regexes = plan_regexes(plan) if self.tp_size > 1 else []

        def style_of(qualname: str) -> Optional[str]:
            for regex, style in regexes:
                if regex.match(qualname):
                    return style
            return None

        def walk(module: nn.Module, prefix: str) -> None:
            for name, child in list(module.named_children()):
                qualname = f"{prefix}.{name}" if prefix else name
                new: Optional[nn.Module] = None
                if isinstance(child, nn.Linear):
                    new = make_linear(child.in_features, child.out_features, child.bias is not None,
                                      style_of(qualname), self.quant_config, f"model.{qualname}")
                elif _is_conv1d(child):
                    in_features, out_features = child.weight.shape
                    new = make_linear(in_features, out_features, child.bias is not None, style_of(qualname),
                                      self.quant_config, f"model.{qualname}", transposed_checkpoint=True)
                else:
                    form = rms_norm_form(child)
                    if form is not None:
                        new = make_rms_norm(child, form, self.device)
                if new is None:
                    walk(child, qualname)
                else:
                    setattr(module, name, new)

        walk(self.model, "")
        embedding = self.model.get_input_embeddings()
        if embedding is not None:
            self.model.set_input_embeddings(
                make_embedding(embedding, self.quant_config, "model.embed_tokens")
            )

    def _attention_modules(self) -> Dict[int, nn.Module]:
        found: Dict[int, nn.Module] = {}
        for module in self.model.modules():
            idx = getattr(module, "layer_idx", None)
            if isinstance(idx, int) and "attention" in type(module).__name__.lower() and idx not in found:
                found[idx] = module
        return found

    def _create_attention_instances(self) -> Dict[int, Attention]:
        model_config = self.bundle.model_config
        text_config = self.text_config
        num_layers = text_config.num_hidden_layers
        head_size = model_config.get_head_size()
        num_heads = text_config.num_attention_heads // self.tp_size
        num_kv_heads = max(1, model_config.get_total_num_kv_heads() // self.tp_size)
        softcap = getattr(text_config, "attn_logit_softcapping", None)
        modules = self._attention_modules()
        self._check_sliding_window()
        instances: Dict[int, Attention] = {}
        for idx in range(self.start_layer, num_layers):
            module = modules.get(idx)
            module_head = getattr(module, "head_dim", head_size) if module is not None else head_size
            if isinstance(module_head, int) and module_head != head_size:
                raise BackendError(
                    f"layer {idx} attends with head size {module_head}, but vLLM sizes the KV cache for "
                    f"{head_size} (ModelConfig.get_head_size()); per-layer head sizes are not supported."
                )
            scaling = getattr(module, "scaling", None)
            scale = float(scaling) if isinstance(scaling, (int, float)) else head_size ** -0.5
            try:
                instances[idx] = Attention(
                    num_heads, head_size, scale, num_kv_heads=num_kv_heads, cache_config=self.cache_config,
                    quant_config=self.quant_config, logits_soft_cap=softcap, prefix=f"model.layers.{idx}.attn",
                )
            except (ValueError, NotImplementedError) as exc:
                if softcap is not None:
                    raise BackendError(
                        f"attention logit soft-capping (attn_logit_softcapping={softcap}) is implemented only "
                        "by vLLM 0.6.2's FlashAttention and FlashInfer backends, not by the one selected here "
                        f"({exc}). Run on a CUDA GPU with bf16/fp16, or use a config without it."
                    ) from exc
                raise
        return instances

    def _check_sliding_window(self) -> None:
        window = getattr(self.text_config, "sliding_window", None)
        layer_types = getattr(self.text_config, "layer_types", None)
        if not window or not layer_types or len(set(layer_types)) == 1:
            return
        max_len = self.bundle.model_config.max_model_len
        if max_len > window:
            raise BackendError(
                f"{type(self.model).__name__} interleaves sliding-window ({window}) and full attention layers; "
                f"vLLM 0.6.2 applies one window to every layer. Set max_model_len <= {window} (then the window "
                f"never applies), it is {max_len} now."
            )

    def _post_init(self, hf_model: nn.Module) -> None:
        """Hook for subclasses (heads) before parameters are allocated."""

    def _materialize_parameters(self) -> None:
        for module in self.modules():
            for name, param in list(module._parameters.items()):
                if param is not None and param.is_meta:
                    fresh = nn.Parameter(torch.empty_like(param, device=self.device), requires_grad=False)
                    fresh.__dict__.update({k: v for k, v in param.__dict__.items() if k != "_is_hf_initialized"})
                    module._parameters[name] = fresh

    # --- forward ----------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: List[torch.Tensor],
        attn_metadata: AttentionMetadata,
        intermediate_tensors: Any = None,
        inputs_embeds: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        ctx = AttentionContext(self.attention_instances, kv_caches, attn_metadata, self.start_layer,
                               record_calls=not self._dispatch_verified)
        hf_inputs: Dict[str, Any] = {"position_ids": positions[None, ...]}
        if inputs_embeds is not None:
            hf_inputs["inputs_embeds"] = inputs_embeds[None, ...]
        else:
            hf_inputs["input_ids"] = input_ids[None, ...]
        with attention_context(ctx):
            outputs = self.model(**hf_inputs, use_cache=False, return_dict=False)
        if ctx.called is not None:
            self._verify_dispatch(ctx.called)
        return outputs[0][0, ...]

    def _verify_dispatch(self, called: set) -> None:
        expected = set(self.attention_instances)
        if called != expected:
            missing = sorted(expected - called)
            raise BackendError(
                self._no_attention_interface_message(
                    f"layers {missing[:8]}{'...' if len(missing) > 8 else ''} did not call the 'vllm' attention "
                    "function (their modules ignore config._attn_implementation or drop **kwargs)"
                )
            )
        self._dispatch_verified = True

    # --- weights ----------------------------------------------------------------------------------

    def weights_mapper(self) -> WeightsMapper:
        cls = self.hf_model_class
        mapper = WeightsMapper()
        for pattern, replacement in (getattr(cls, "_checkpoint_conversion_mapping", None) or {}).items():
            mapper.add_rename(pattern, replacement)
        add_checkpoint_transforms(mapper, self._checkpoint_transforms)
        legacy_renames(mapper)
        for name in self._output_embedding_names:
            mapper.prefixes.append((f"{name}.", "lm_head."))
        prefixes = [p for p in dict.fromkeys((self._checkpoint_prefix, getattr(cls, "base_model_prefix", ""))) if p]
        for prefix in prefixes:
            mapper.prefixes += [(f"{prefix}.lm_head.", "lm_head."), (f"{prefix}.", "model."), (f"{prefix}.", "")]
        mapper.prefixes.append(("", "model."))
        for pattern in getattr(cls, "_keys_to_ignore_on_load_unexpected", None) or ():
            mapper.add_ignore_unexpected(pattern)
        computed_buffer_ignores(mapper)
        return mapper

    def _skipped_weights(self) -> Tuple[str, ...]:
        return ()

    def load_weights(self, weights: Iterable[Tuple[str, torch.Tensor]]) -> set:
        return load_weights(self, weights, self.weights_mapper(), skip=self._skipped_weights())
