"""``Base``: an HF ``transformers`` model running inside vLLM 0.6.2's engine.

Construction (inside vLLM's loader, under ``with torch.device(target)`` and the model dtype):

1. build the HF model from its config with parameters on the meta device (buffers such as rotary
   ``inv_freq`` are computed for real, on the target device; :mod:`.hf_model`, shared with ``check``);
2. with pipeline parallelism, keep this rank's modules (``pp_plan``, :mod:`.pipeline`); mixture-of-experts
   blocks' experts become vLLM ``FusedMoE`` layers where the kernel runs (the ``moe`` speed pass, first:
   :mod:`.moe`); swap ``nn.Linear``/``Conv1D`` for vLLM linears (by ``tp_plan`` style, :mod:`.tp_plan`; unquantized
   ones on meta, so that those a speed pass replaces never take device memory) and the input embedding for
   ``VocabParallelEmbedding`` (keeping ``embed_scale``);
3. run the speed passes (:mod:`.passes`): RMS norms, q/k/v and gate/up fusion, gated MLPs, rotary, rotary tables,
   residual fusion; the model keeps their reports (``speed_passes``, shown by ``doctor``);
4. create one vLLM ``Attention`` per layer, reached from the ``"vllm"`` attention function;
5. allocate what is still on meta on the target device; weights come later through ``load_weights``.

Decode step: ``forward``, called by vLLM's model runner, opens the attention context (:mod:`.attention`:
this step's KV caches and metadata, the model's rotary state) and calls the HF body on the step's tokens
as one batch (``[1, tokens]``): the input embedding, then per decoder layer the RMS norm (or the fused
add-and-norm), q/k/v as one GEMM, the rotation, the ``"vllm"`` attention function and vLLM's paged
attention (or a layer's own window, :mod:`.windowed_attention`), ``o_proj``, the second norm, gate/up as
one GEMM, ``act_and_mul``, ``down_proj``, the residual adds (or the residual carried to the next layer);
then the final norm. The hidden states (``[tokens, hidden]``) go to the wrapper's head (:mod:`.causal`,
:mod:`.sequence_classification`) or pooler (:mod:`.pooling`), or to the next pipeline rank. README
"Layout" lists the same path with the module behind each step.
"""
from __future__ import annotations

import contextlib
from typing import Any, ContextManager, Dict, Iterable, Iterator, List, Optional, Tuple

import torch
from torch import nn

from vllm.attention import Attention, AttentionMetadata
from vllm.distributed import get_tensor_model_parallel_world_size
from vllm.sequence import IntermediateTensors

from . import (body_forward, compat, devices, fusion, hf_model as hf, kernels, legacy_attention, lora, moe, pipeline,
               quantization, sliding_window)
from ._logging import get_logger, preview
from .attention import AttentionContext, EncoderOnlyAttention, attention_context, register_attention_function
from .body_forward import LeanBody
from .config import BackendConfig, current_backend_config
from .hf_model import BackendError
from .layers import GatheredHeadsAttention, make_embedding, make_linear
from .passes import Build, PassReport, run_speed_passes
from .tp_plan import TPPlan, collect_tp_plan, uses_later_release_plan
from .weights import WeightsMapper, build_weights_mapper, load_weights
from .windowed_attention import WindowedAttention

logger = get_logger(__name__)

__all__ = ["Base", "BackendError"]


def _gathers_heads(attention_module: Optional[nn.Module]) -> bool:
    """Whether the plan gathers this attention module's projections (every head on every rank)."""
    from vllm.model_executor.layers.linear import ColumnParallelLinear

    return attention_module is not None and any(
        isinstance(m, ColumnParallelLinear) and m.gather_output for m in attention_module.modules())


class Base(nn.Module):
    """Shared by the causal and pooling wrappers: the HF model, its swapped layers, its attention."""

    #: The HF auto class the wrapper builds (the causal wrapper builds ``AutoModelForCausalLM``).
    hf_auto_class = "AutoModel"
    #: Whether the wrapper can run encoder-only (bidirectional) models: only the pooling one.
    supports_encoder = False

    def __init__(
        self,
        config: Any,
        cache_config: Any = None,
        quant_config: Any = None,
        lora_config: Any = None,
        **_: Any,
    ) -> None:
        super().__init__()
        compat.check_transformers()
        bundle = current_backend_config()
        if bundle is None:
            raise BackendError(
                f"{type(self).__name__} must be built by vLLM's model loader (the model_loader patch hands it "
                "the ModelConfig); construct it through vllm.LLM(..., model_impl='transformers'), and check "
                "`python -m vllm_transformers_backend doctor` if you did."
            )
        if lora_config is not None and not getattr(type(self), "supports_lora", False):
            raise BackendError(f"{type(self).__name__} does not take LoRA adapters (the causal model does).")
        refused = quantization.refusal(quant_config)
        if refused:
            raise BackendError(refused)
        register_attention_function()

        self.bundle: BackendConfig = bundle
        self.config = config
        self.text_config = compat.get_text_config(config)
        self.cache_config = cache_config
        self.quant_config = quant_config
        self.lora_config = lora_config
        self.device = devices.current_device()
        self.dtype = torch.get_default_dtype()
        devices.check_dtype_supported(self.device, self.dtype)  # bf16 on an MLU370: error naming fp16
        self.tp_size = get_tensor_model_parallel_world_size()
        # This pipeline rank's decoder layers (all of them without pipeline parallelism).
        self.start_layer, self.end_layer = 0, self.text_config.num_hidden_layers
        self.pipeline: Optional[pipeline.PipelineStage] = None
        self._pp_missing_prefixes: List[str] = []
        self._dispatch_verified = False

        hf_model = hf.build(self.config, self.hf_auto_class, dtype=self.dtype,
                            trust_remote_code=self.bundle.trust_remote_code)
        self.hf_model_class = type(hf_model)
        self._checkpoint_prefix, self.model = hf.base_model_of(hf_model)
        self._output_embedding_names = hf.output_embedding_names(hf_model)
        # read off the HF model as built (transformers 5 walks its sub-models for checkpoint transforms)
        self._checkpoint_mapper = self.checkpoint_mapper(hf_model, self._checkpoint_prefix, self.model)
        hf.check_attention_backend_support(hf_model)
        if lora_config is not None:
            problem = lora.check_supported(lora_config, self._checkpoint_prefix, self.hf_model_class.__name__)
            if problem:
                raise BackendError(f"LoRA: {problem}.")
        #: Whether the input embedding and the LM head take LoRA (with vLLM's extra LoRA vocabulary).
        self.vocabulary_lora = lora.vocabulary_lora(lora_config, compat.ties_word_embeddings(self.config),
                                                    self.model.get_input_embeddings(), self._output_embedding_names)
        self.is_encoder = self._detect_encoder()
        if self.is_encoder:
            self._check_position_range()
        elif not getattr(self.bundle.model_config, "embedding_mode", False):  # it will decode
            kernels.check_paged_attention_head_size(self.device, self.bundle.model_config.get_head_size())
        self._setup_pipeline(hf_model)
        self._tp_plan_map = collect_tp_plan(hf_model, self.model, self._checkpoint_prefix, self.text_config)
        if self.tp_size > 1 and uses_later_release_plan(self.text_config):
            logger.info("transformers %s declares no tp_plan for %s: sharding it with the plan a later release "
                        "declares", compat.transformers_version(), self.text_config.model_type)
        head_size = self.bundle.model_config.get_head_size()
        build = Build(self.model, self.device, tp_size=self.tp_size, quant_config=self.quant_config,
                      head_size=head_size, num_layers=self.text_config.num_hidden_layers, is_encoder=self.is_encoder,
                      prefix=self._checkpoint_prefix, owner=self, dtype=self.dtype,
                      max_positions=self.bundle.model_config.max_model_len)
        self.moe, moe_report = self._prepare_moe(build)
        self._replace_modules()
        legacy_attention.shard_for_tensor_parallel(
            self.model, self.tp_size, self.text_config.num_attention_heads,
            self.bundle.model_config.get_total_num_kv_heads(), head_size, _gathers_heads)
        self.speed_passes: List[PassReport] = [moe_report] + run_speed_passes(build)
        rotary = next((r for r in self.speed_passes if r.name == "rotary"), None)
        #: The modeling modules whose rotation runs through vLLM's kernel in this model's forward, and whether
        #: their cos/sin halves were found equal (rotary.py); empty when the rotary pass did not run.
        self._rotary_modules: Dict[str, Optional[bool]] = dict(rotary.forward_state or {}) if rotary else {}
        self.fused_rotary: Optional[str] = ", ".join(self._rotary_modules) or None
        body = next((r for r in self.speed_passes if r.name == "body_forward"), None)
        #: The body's lean forward (body_forward.py), checked against HF's at the first forward; None: HF's body.
        self._lean_body: Optional[LeanBody] = body.forward_state if body else None
        self.attention_instances: Dict[int, Any] = self._create_attention_instances()
        self._post_init(hf_model)
        self._declare_lora_modules()
        self._materialize_parameters()
        logger.info("Transformers backend: %s (HF %s) on %s, %d attention layers of head size %d",
                    type(self).__name__, type(self.model).__name__, self.device, len(self.attention_instances),
                    head_size)

    # --- construction -----------------------------------------------------------------------------

    def _prepare_moe(self, build: Build) -> Tuple[moe.MoEPlan, PassReport]:
        """Mixture-of-experts blocks: the FusedMoE pass where it runs, HF's expert code elsewhere (:mod:`.moe`)."""
        try:
            return moe.prepare_moe(build, enforce_eager=bool(getattr(self.bundle.model_config, "enforce_eager", False)))
        except moe.MoEError as exc:
            raise BackendError(f"{self.hf_model_class.__name__}: {exc}") from exc

    def _detect_encoder(self) -> bool:
        """An encoder, as upstream decides it (:func:`.hf_model.model_kind`)."""
        kind = hf.model_kind(self.model)
        if kind.kind == "decoder":
            return False
        if kind.kind == "mixed":
            raise BackendError(f"{type(self.model).__name__} mixes causal and bidirectional attention layers "
                               f"({kind.evidence}); the backend runs decoder-only or encoder-only models.")
        if not self.supports_encoder:
            raise BackendError(
                f"{type(self.model).__name__} is an encoder-only model (its attention has is_causal=False): it "
                "embeds, it does not generate. Run it with runner='pooling' (LLM(..., runner='pooling') and "
                "llm.embed(...), or `vllm serve ... --runner pooling`)."
            )
        indices = [getattr(m, "layer_idx", None) for m in kind.modules]
        if not all(isinstance(i, int) for i in indices) or len(set(indices)) != len(indices):
            # Some encoders (ESM before transformers 5) never number their layers; encoder attention keeps
            # no cache, so numbering them in module order is all the attention function needs.
            for number, module in enumerate(kind.modules):
                module.layer_idx = number
        return True

    def _tp_plan(self) -> Dict[str, str]:
        """The tp_plan relative to the body: config, body class and top model class/instance plans."""
        return dict(self._tp_plan_map)

    def _replace_modules(self) -> None:
        plan = TPPlan(self._tp_plan() if self.tp_size > 1 else {})
        if self.tp_size > 1 and not plan:
            raise BackendError(
                f"{self.hf_model_class.__name__} ({type(self.model).__name__}) has no tp_plan, so it cannot be "
                f"sharded over {self.tp_size} ranks. Add `base_model_tp_plan` to its config (or `_tp_plan` to the "
                "model class), mapping each linear's name pattern to 'colwise'/'rowwise', or run with "
                "tensor_parallel_size=1."
            )
        if plan:
            kept = plan.check_unreplaced(self.model, lambda m: hf.is_linear(m) or self.moe.handles(m),
                                         self.model.get_input_embeddings())
            if kept:
                logger.info("tp_plan styles of %d non-linear module(s)/tensor(s) are not sharded (kept whole on "
                            "every rank, same result): %s", len(kept), preview(kept, 6))
        style_of = plan.style_of
        # K/V projections with fewer heads than ranks hold whole (replicated) heads, as vLLM's QKV layer does.
        total_kv_heads = self.bundle.model_config.get_total_num_kv_heads()
        head_size = self.bundle.model_config.get_head_size()
        kv_head_size = head_size if 1 < self.tp_size and total_kv_heads < self.tp_size else None
        kv_out_features = total_kv_heads * head_size
        q_out_features = self.text_config.num_attention_heads * head_size

        def kv_size_for(out_features: int) -> Optional[int]:
            return kv_head_size if out_features == kv_out_features != q_out_features else None

        def walk(module: nn.Module, prefix: str) -> None:
            for name, child in list(module.named_children()):
                qualname = f"{prefix}.{name}" if prefix else name
                if hf.is_linear(child):
                    in_features, out_features = hf.linear_features(child)
                    with self._unallocated():
                        layer = make_linear(
                            in_features, out_features, child.bias is not None, style_of(qualname),
                            self.quant_config, self.checkpoint_name(qualname),
                            transposed_checkpoint=hf.is_conv1d(child), kv_head_size=kv_size_for(out_features))
                    setattr(module, name, layer)
                else:
                    walk(child, qualname)

        walk(self.model, "")
        embedding = self.model.get_input_embeddings()
        if embedding is not None and not isinstance(embedding, pipeline.PPMissingLayer):
            extra_rows = lora.extra_vocab_rows(self.lora_config)[0] if self.vocabulary_lora else 0
            self.model.set_input_embeddings(
                make_embedding(embedding, self.quant_config, self.checkpoint_name(self._input_embedding_qualname()),
                               extra_rows=extra_rows)
            )

    def _unallocated(self) -> ContextManager[Any]:
        """Where layers that a speed pass may replace are built: on meta, allocated on the device at the end
        (:meth:`_materialize_parameters`) if they are still in the model then.

        Built on the device, the q/k/v and gate/up linears that projection fusion replaces (and a tied head's own
        weight) were allocated and freed between the layers that stay: the caching allocator's segments kept
        the holes (empty_cache frees only whole segments), and vLLM's profile, which reads the device's free
        memory, counted them against the KV cache. Quantized methods keep the device: some create parameters
        that are materialized where they are when the checkpoint arrives (GGUF's ``UninitializedParameter``)."""
        return torch.device("meta") if self.quant_config is None else contextlib.nullcontext()

    def checkpoint_name(self, qualname: str) -> str:
        """The checkpoint (HF) name of a module of the body: what quantization ignore lists are written in."""
        return ".".join(part for part in (self._checkpoint_prefix, qualname) if part)

    def _input_embedding_qualname(self) -> str:
        embedding = self.model.get_input_embeddings()
        return next((name for name, module in self.model.named_modules() if module is embedding), "embed_tokens")

    def _declare_lora_modules(self) -> None:
        """vLLM's LoRA attributes of this instance, from the layers built (see lora.py)."""
        if not getattr(type(self), "supports_lora", False):
            return
        vocabulary = self._input_embedding_qualname().rpartition(".")[2] if self.vocabulary_lora else None
        attributes, unsupported = lora.lora_attributes(self, "model", fusion.packed_modules_mapping(self.model),
                                                       self.tp_size, vocabulary)
        for name, value in attributes.items():
            setattr(self, name, value)
        if self.lora_config is not None:
            logger.info("LoRA: adapters may target %s%s", ", ".join(
                n for m in attributes["supported_lora_modules"] for n in attributes["packed_modules_mapping"].get(m, [m])),
                f"; not {', '.join(unsupported)} (no LoRA layer for their vLLM layers)" if unsupported else "")

    def _attention_modules(self) -> Dict[int, nn.Module]:
        return {module.layer_idx: module for _, module in hf.attention_modules(self.model)}

    def _create_attention_instances(self) -> Dict[int, Any]:
        # Per layer, the window the backend applies itself (sliding_window.py); None: vLLM's Attention as is.
        windows = self._layer_windows()
        if self.is_encoder:
            return {idx: EncoderOnlyAttention(idx) for idx in sorted(self._attention_modules())}
        model_config = self.bundle.model_config
        text_config = self.text_config
        head_size = model_config.get_head_size()
        total_heads, total_kv_heads = text_config.num_attention_heads, model_config.get_total_num_kv_heads()
        num_heads = total_heads // self.tp_size
        num_kv_heads = max(1, total_kv_heads // self.tp_size)
        softcap = getattr(text_config, "attn_logit_softcapping", None)
        modules = self._attention_modules()
        names = {id(module): name for name, module in hf.attention_modules(self.model)}
        instances: Dict[int, Attention] = {}
        for idx in range(self.start_layer, self.end_layer):
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
                    quant_config=self.quant_config, logits_soft_cap=softcap,
                    prefix=self.checkpoint_name(f"{names.get(id(module), f'layers.{idx}')}.attn"),
                )
                if windows[idx] is not None:
                    instances[idx] = WindowedAttention(instances[idx], windows[idx])
                if self.tp_size > 1 and _gathers_heads(module):
                    instances[idx] = GatheredHeadsAttention(instances[idx], total_heads, total_kv_heads, head_size)
            except BackendError:
                raise
            except (ValueError, NotImplementedError) as exc:
                if softcap is not None:
                    raise BackendError(
                        f"attention logit soft-capping (attn_logit_softcapping={softcap}) is implemented only "
                        "by vLLM 0.6.2's FlashAttention and FlashInfer backends, not by the one selected here "
                        f"({exc}). Run on a CUDA GPU with bf16/fp16, or use a config without it."
                    ) from exc
                raise
        return instances

    def _layer_windows(self) -> List[Optional[int]]:
        windows = sliding_window.backend_windows(self.bundle.model_config, self.text_config, self.cache_config)
        name = type(self.model).__name__
        sliding_window.check_module_windows(self._attention_modules(), sliding_window.layer_windows(self.text_config),
                                            name)
        shortest = min((w for w in windows if w is not None), default=None)
        if shortest is not None and self.is_encoder:
            raise BackendError(f"{name} is a bidirectional encoder with sliding-window layers ({shortest}); the "
                               f"backend's encoder attention has no window. Set max_model_len <= {shortest}.")
        if shortest is not None:
            logger.info("per-layer sliding windows at max_model_len %d, applied by the backend: %s",
                        self.bundle.model_config.max_model_len,
                        "; ".join(sliding_window.describe(windows, getattr(self.text_config, "layer_types", None))))
        return windows

    def _post_init(self, hf_model: nn.Module) -> None:
        """Hook for subclasses (heads) before parameters are allocated."""

    def _check_position_range(self) -> None:
        """RoBERTa-style absolute positions start after the padding index: fewer usable positions than
        ``max_position_embeddings``, which vLLM takes as the maximum length."""
        embeddings = getattr(self.model, "embeddings", None)
        table = getattr(embeddings, "position_embeddings", None)
        padding_idx = getattr(embeddings, "padding_idx", None)
        if not isinstance(table, nn.Embedding) or not isinstance(padding_idx, int):
            return
        usable = table.num_embeddings - padding_idx - 1
        max_len = self.bundle.model_config.max_model_len
        if max_len > usable:
            raise BackendError(
                f"{type(self.model).__name__} numbers positions from padding_idx + 1 = {padding_idx + 1}, so it has "
                f"{usable} usable positions, but max_model_len is {max_len}. Pass max_model_len={usable}."
            )

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
        if self.is_encoder:
            return self._encoder_forward(input_ids, attn_metadata)
        ctx = self._attention_context(kv_caches, attn_metadata)
        stage = self.pipeline
        lean = self._lean_body if stage is None and inputs_embeds is None else None
        if lean is not None and lean.state == "on":
            with attention_context(ctx):
                hidden = lean.forward(ctx, input_ids, positions)
            if hidden is not None:
                return hidden
        hf_inputs: Dict[str, Any] = {"position_ids": positions[None, ...]}
        if stage is not None and not stage.is_first:
            # The previous rank's hidden states go to this rank's first layer (a pre-hook); what the body
            # computes from inputs_embeds before that layer is discarded.
            stage.received = intermediate_tensors["hidden_states"][None, ...]
            hf_inputs["inputs_embeds"] = stage.received
        elif inputs_embeds is not None:
            hf_inputs["inputs_embeds"] = inputs_embeds[None, ...]
        else:
            hf_inputs["input_ids"] = input_ids[None, ...]
        with attention_context(ctx):
            outputs = self.model(**hf_inputs, use_cache=False, return_dict=False)
        if ctx.called is not None:
            self._verify_dispatch(ctx.called)
        if lean is not None and lean.state == "pending":
            # HF's output leaves the device for the check (lean is only set without pipeline stages, so nothing
            # below needs `outputs`): this first forward is vLLM's memory profile, and the lean forward of the
            # check should not peak higher by HF's output than the forwards that follow.
            device = outputs[0].device
            reference = outputs[0][0, ...].to("cpu")
            del outputs
            hidden = lean.check(lambda: self._attention_context(kv_caches, attn_metadata), input_ids, positions,
                                reference, device)
            body_forward.record_check(self.speed_passes, lean)
            return hidden
        if stage is not None:
            stage.received = None
            if not stage.is_last:
                sent, stage.sent = stage.sent, None
                return IntermediateTensors({"hidden_states": sent[0, ...]})
        return outputs[0][0, ...]

    def _attention_context(self, kv_caches: List[torch.Tensor], attn_metadata: AttentionMetadata) -> AttentionContext:
        return AttentionContext(self.attention_instances, kv_caches, attn_metadata, self.start_layer,
                                record_calls=not self._dispatch_verified, rotary_modules=self._rotary_modules)

    def _encoder_forward(self, input_ids: torch.Tensor, attn_metadata: AttentionMetadata) -> torch.Tensor:
        """Runs the step's prompts through the HF encoder in batches of equal length and returns their
        tokens' hidden states in the step's flattened order.

        Equal lengths need no padding: HF derives positions per sequence itself (absolute, RoBERTa's
        offset past the padding index, ESM's rotary), attention never crosses sequences, and nothing
        depends on the batch's padding (transformers 4.x ESM scales masked-token embeddings by the
        padded length)."""
        out: Optional[torch.Tensor] = None
        for index, _ in self._equal_length_batches(input_ids, attn_metadata):
            hidden = self._run_encoder(input_ids=input_ids[index])[0]
            if out is None:
                out = hidden.new_empty((input_ids.shape[0], hidden.shape[-1]))
            out[index.reshape(-1)] = hidden.reshape(-1, hidden.shape[-1])
        assert out is not None
        return out

    def _equal_length_batches(self, input_ids: torch.Tensor,
                              attn_metadata: AttentionMetadata) -> List[Tuple[torch.Tensor, List[int]]]:
        """The step's whole prompts grouped by length: per group, the ``[batch, length]`` positions of its
        tokens in the flattened step and the prompts' numbers in step order."""
        seq_lens = getattr(attn_metadata, "seq_lens", None)
        if not seq_lens or getattr(attn_metadata, "num_decode_tokens", 0):
            raise BackendError("an encoder-only model runs whole prompts only (vLLM's embedding runner); this step "
                               "has no prompt lengths or has decode tokens.")
        groups: Dict[int, Tuple[List[int], List[int]]] = {}
        offset = 0
        for number, length in enumerate(seq_lens):
            starts, numbers = groups.setdefault(length, ([], []))
            starts.append(offset)
            numbers.append(number)
            offset += length
        return [((torch.tensor(starts)[:, None] + torch.arange(length)[None, :]).to(input_ids.device), numbers)
                for length, (starts, numbers) in groups.items()]

    def _run_encoder(self, **inputs: torch.Tensor) -> Any:
        """One forward of the HF encoder body on a padding-free batch; returns HF's output object."""
        ctx = AttentionContext(self.attention_instances, [], None, record_calls=not self._dispatch_verified,
                               rotary_modules=self._rotary_modules)
        with attention_context(ctx):
            outputs = self.model(**inputs, return_dict=True)
        if ctx.called is not None:
            self._verify_dispatch(ctx.called)
        return outputs

    def _verify_dispatch(self, called: set) -> None:
        expected = set(self.attention_instances)
        if called != expected:
            raise hf.AttentionInterfaceError(self.config, hf.undispatched_layers(sorted(expected - called)))
        self._dispatch_verified = True

    # --- weights ----------------------------------------------------------------------------------

    @classmethod
    def checkpoint_mapper(cls, hf_model: nn.Module, checkpoint_prefix: str, body: nn.Module) -> WeightsMapper:
        """Checkpoint names -> this wrapper's parameter names, for the HF model it wraps (also ``check``'s)."""
        return build_weights_mapper(type(hf_model), checkpoint_prefix, hf.output_embedding_names(hf_model),
                                    compat.checkpoint_transforms(hf_model))

    def weights_mapper(self) -> WeightsMapper:
        """:meth:`checkpoint_mapper` (read off the HF model at build) with what the built model adds: the fused
        layers' shards and the quantization method's checkpoint rules."""
        mapper = self._checkpoint_mapper.copy()
        mapper.stacked.update(fusion.stacked_shards(self))
        quantization.add_checkpoint_rules(mapper, self.quant_config)
        return mapper

    @classmethod
    def checkpoint_target(cls, hf_model: nn.Module, body: nn.Module) -> nn.Module:
        """A module with this wrapper's parameter names holding the HF model's own (unsharded, unfused)
        parameters: what ``check`` runs the loader's dry run against."""
        target = nn.Module()
        target.model = body
        return target

    @classmethod
    def skipped_weights(cls, config: Any) -> Tuple[str, ...]:
        """Parameters the checkpoint need not fill and whose entries are dropped (a tied LM head)."""
        return ()

    def load_weights(self, weights: Iterable[Tuple[str, torch.Tensor]]) -> set:
        mapper = self.weights_mapper()
        if self._pp_missing_prefixes:
            weights = self._pipeline_local_weights(weights, mapper)
        # Expert tensors of either layout (unquantized: a quantized checkpoint's experts load by name, as HF's)
        consumers = [self.moe.weight_consumer(self, mapper)] if self.moe and self.quant_config is None else []
        loaded = load_weights(self, weights, mapper, skip=self.skipped_weights(self.config), consumers=consumers)
        quantization.finish_attention_loading(self.attention_instances.values())
        return loaded

    def _pipeline_local_weights(self, weights: Iterable[Tuple[str, torch.Tensor]],
                                mapper: WeightsMapper) -> Iterator[Tuple[str, torch.Tensor]]:
        """Drops the checkpoint tensors of modules that live on other pipeline ranks (a tensor that maps to
        a parameter of this rank is always kept)."""
        targets = {**dict(self.named_buffers()), **dict(self.named_parameters(remove_duplicate=False))}
        for name, tensor in weights:
            if mapper.map(name, targets) is None and pipeline.is_missing_weight(mapper.candidates(name),
                                                                                 self._pp_missing_prefixes):
                continue
            yield name, tensor

    # --- pipeline parallelism ---------------------------------------------------------------------

    def _setup_pipeline(self, hf_model: nn.Module) -> None:
        """With pipeline parallelism, keeps this rank's part of the body (``pp_plan``)."""
        rank, size = pipeline.pp_rank_and_size()
        if size == 1:
            return
        plan = pipeline.collect_pp_plan(hf_model, self.model, self._checkpoint_prefix, self.text_config)
        if not plan:
            raise BackendError(
                f"{self.hf_model_class.__name__} ({type(self.model).__name__}) has no pp_plan, so it cannot be split "
                f"over {size} pipeline ranks. Add `base_model_pp_plan` to its config (or `_pp_plan` to the model "
                "class): the body's modules in forward order, e.g. {'embed_tokens': (['input_ids'], "
                "['inputs_embeds']), 'layers': (['hidden_states', 'attention_mask'], ['hidden_states']), "
                "'norm': (['hidden_states'], ['hidden_states'])}; or run with pipeline_parallel_size=1."
            )
        try:
            self.pipeline = pipeline.split_body(self.model, plan, self.text_config.num_hidden_layers, rank, size,
                                                keep_input_embedding_on_last=compat.ties_word_embeddings(self.config))
        except pipeline.PipelineError as exc:
            raise BackendError(f"{self.hf_model_class.__name__}: {exc}") from exc
        self.start_layer, self.end_layer = self.pipeline.start_layer, self.pipeline.end_layer
        self._pp_missing_prefixes = [f"model.{name}." for name in self.pipeline.missing]
        logger.info("pipeline rank %d/%d: layers %d-%d of %d%s", rank, size, self.start_layer, self.end_layer - 1,
                    self.text_config.num_hidden_layers,
                    f"; elsewhere: {', '.join(self.pipeline.missing)}" if self.pipeline.missing else "")

    def make_empty_intermediate_tensors(self, batch_size: int, dtype: torch.dtype,
                                        device: torch.device) -> IntermediateTensors:
        """What a later pipeline rank receives: the hidden states (HF layers keep the residual inside)."""
        hidden = torch.zeros((batch_size, self.text_config.hidden_size), dtype=dtype, device=device)
        return IntermediateTensors({"hidden_states": hidden})
