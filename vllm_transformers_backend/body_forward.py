"""A decoder body whose every layer runs vLLM's way, run as vLLM's own model forward: the ``body_forward`` speed
pass (:mod:`.passes`).

Decode step: when it applies, the backend's ``forward`` does not call the HF body at all: it embeds the step's
token rows, looks the step's cos/sin up in the rotary table, and for each decoder layer runs the norms, the
fused ``qkv_proj``, vLLM's rotary kernel, the layer's vLLM ``Attention``, ``o_proj`` and the gated MLP's
``gate_up`` / ``act_and_mul`` / ``down`` directly, carrying the residual through vLLM's fused add-and-norm,
then the final norm: the loop of vLLM's ``LlamaModel.forward``. CUDA graphs replay decode steps without Python,
so this matters where steps run eagerly: prefills on GPUs (a small model's prefill step is host-bound) and every
step on the CPU.

The earlier passes already make each layer compute what vLLM's layers compute (``residual``,
``attention_forward``, ``glu``, ``rotary_table``); what stays is Python around them: the HF body's forward
(mask and cache set-up, output bookkeeping, decorators), each decoder layer's call (HF's
``GradientCheckpointingLayer.__call__``, keyword handling), the attention module's checks and the 3-D
``[1, tokens, hidden]`` views (on the CPU engine, a 24-layer body's prefill forward took 12% less host time).

It applies when every decoder layer on this rank carries all three of those replacements, the body has one
``embed_tokens``, one ``rotary_emb`` answering from its table and a vLLM RMS ``norm``, and there is one
pipeline stage. What the HF body's forward does beyond ``norm(layers(embed(ids)))`` (Gemma's embedding
scale, a Granite multiplier, a remote-code body's extra step) is not read from its source: at the model's
first forward (vLLM's profiling run on GPUs, the first step on the CPU engine) both forwards run on the same
inputs and the lean one is kept only if its output equals HF's exactly (it runs the same kernels in the same
order, the residual sums of the first and last layer included). Otherwise HF's body keeps running and the
pass's report says why. At run time a step without the rotary kernel's table (positions not int64, multimodal
rotary), with input embeddings or from another pipeline rank goes to HF's body.

``live.get_hf_model`` puts HF's body back (hooks on layers, attention modules and MLPs fire only inside it).
``VLLM_TRANSFORMERS_BACKEND_FUSE_BODY=0`` (or ``VLLM_TRANSFORMERS_BACKEND_FUSE=0``) keeps HF's body forward.
"""
from __future__ import annotations

from typing import Any, Callable, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import nn

from vllm import _custom_ops as ops

from ._logging import get_logger
from .attention import AttentionContext
from .attention_forward import is_lean
from .fusion import FUSE_ENV, is_lean_glu
from .layers import HFGemmaRMSNorm, HFRMSNorm, linear_rows
from .passes import Build, Replacement, SpeedPass, Verdict
from .pipeline import PPMissingLayer
from .residual import decoder_layers, is_fused

logger = get_logger(__name__)

BODY_ENV = "VLLM_TRANSFORMERS_BACKEND_FUSE_BODY"


class _Layer(NamedTuple):
    """One decoder layer's modules as the lean loop calls them (read at the first forward, after vLLM's LoRA
    manager may have wrapped the linears)."""

    input_norm: nn.Module
    qkv: nn.Module
    sizes: Tuple[int, int, int]
    head_dim: int
    layer_idx: int
    o_proj: nn.Module
    post_norm: nn.Module
    gate_up: nn.Module
    act_and_mul: nn.Module
    down: nn.Module


class LeanBody:
    """The lean forward of one body and whether it has been checked against HF's (``state``: ``"pending"``
    until the first forward, then ``"on"``, or ``"off"`` with ``problem`` saying why)."""

    def __init__(self, body: nn.Module, layers: Sequence[nn.Module]) -> None:
        self.body = body
        self.hf_layers = list(layers)
        self.layers: List[_Layer] = []
        self.state = "pending"
        self.problem: Optional[str] = None

    def _bind(self) -> None:
        bound = []
        for layer in self.hf_layers:
            attn, mlp = layer.self_attn, layer.mlp
            lean = attn._vtb_lean
            bound.append(_Layer(layer.input_layernorm, attn.q_proj.fused_layer, lean.sizes, lean.head_dim,
                                attn.layer_idx, attn.o_proj, layer.post_attention_layernorm,
                                mlp.gate_proj.fused_layer, mlp.vllm_act_and_mul, mlp.down_proj))
        self.layers = bound

    def forward(self, ctx: AttentionContext, input_ids: torch.Tensor, positions: torch.Tensor) -> Optional[torch.Tensor]:
        """The final hidden states (rows), or None when this step needs HF's body (no kernel table)."""
        if positions.dim() != 1 or positions.dtype != torch.int64:
            return None
        body = self.body
        hidden = body.embed_tokens(input_ids)
        cos, _ = body.rotary_emb(hidden[None], positions[None])
        step = ctx.rotary.get(id(cos))
        if step is None or step.table is None:
            return None
        kv_caches, metadata, start = ctx.kv_caches, ctx.attn_metadata, ctx.start_layer
        instances = ctx.instances
        residual: Optional[torch.Tensor] = None
        for layer in self.layers:
            if residual is None:
                # as the residual pass's first layer: HF's own (unfused) sum, so both bodies agree bit for bit
                normed = layer.input_norm(hidden)
            else:
                normed, residual = layer.input_norm(hidden, residual)
            q, k, v = linear_rows(layer.qkv, normed).split(layer.sizes, dim=-1)
            ops.rotary_embedding(step.positions, q, k, layer.head_dim, step.table, True)
            idx = layer.layer_idx
            attn_out = layer.o_proj(instances[idx](q, k, v, kv_caches[idx - start], metadata))
            # q/k/v are views of the layer's whole qkv output: held through the MLP they raise the peak that
            # vLLM's memory profile sizes the KV cache from (native vLLM frees them on leaving its attention)
            del q, k, v
            if residual is None:
                residual = hidden + attn_out
                normed = layer.post_norm(residual)
            else:
                normed, residual = layer.post_norm(attn_out, residual)
            hidden = layer.down(layer.act_and_mul(linear_rows(layer.gate_up, normed)))
        return body.norm(residual + hidden)

    def check(self, make_context: Callable[[], AttentionContext], input_ids: torch.Tensor, positions: torch.Tensor,
              hf_hidden: torch.Tensor, device: torch.device) -> torch.Tensor:
        """The first forward: binds the layers and keeps the lean forward only if it gives HF's output exactly;
        returns the forward's output on ``device`` (the lean one where it is kept, else HF's).

        ``hf_hidden`` is HF's output already copied off the device by the caller (on the CPU engine: itself).
        The first forward is vLLM's memory profile, whose peak sizes the KV cache: HF's output held on the device
        while the lean forward runs would add its size (tokens x hidden) to that peak where the peak falls in the
        lean forward. (The backend's smaller KV cache on GPUs predates this pass; README, Performance.)"""
        from .attention import attention_context

        self._bind()
        ctx = make_context()
        with attention_context(ctx):
            lean = self.forward(ctx, input_ids, positions)
        rows = None if lean is None else lean.to(hf_hidden.device)
        if rows is None:
            self.problem = "the first forward had no rotary kernel table (positions not int64, or another rotary)"
        elif rows.shape != hf_hidden.shape or rows.dtype != hf_hidden.dtype:
            self.problem = f"its output is {tuple(rows.shape)} {rows.dtype}, HF's body gives " \
                           f"{tuple(hf_hidden.shape)} {hf_hidden.dtype}"
        elif not torch.equal(rows, hf_hidden):
            diff = (rows.float() - hf_hidden.float()).abs().max().item()
            self.problem = (f"{type(self.body).__name__}.forward does more than norm(layers(embed(ids))) (the "
                            f"outputs differ by up to {diff:.3g}: an embedding scale or another extra step)")
        self.state = "off" if self.problem else "on"
        if self.problem:
            self.layers = []
            logger.info("speed pass body_forward: HF's body forward kept: %s", self.problem)
        else:
            logger.info("speed pass body_forward: the lean body forward gives HF's output exactly on the first "
                        "forward; it runs from now on")
            return lean
        return hf_hidden.to(device)


def _layer_problem(layer: nn.Module) -> Optional[str]:
    if isinstance(layer, PPMissingLayer):
        return "a layer lives on another pipeline rank"
    if not is_fused(layer):
        return f"{type(layer).__name__} keeps HF's forward (residual pass)"
    attn, mlp = layer._modules.get("self_attn"), layer._modules.get("mlp")
    if attn is None or not is_lean(attn):
        return f"{type(layer).__name__}'s attention keeps HF's forward (attention_forward pass)"
    if mlp is None or not is_lean_glu(mlp):
        return f"{type(layer).__name__}'s MLP is not a fused gated MLP (glu pass)"
    return None


def _is_rms_norm(module: Optional[nn.Module]) -> bool:
    return isinstance(module, (HFRMSNorm, HFGemmaRMSNorm))


class BodyForward(SpeedPass):
    """A decoder body whose every layer the earlier passes made vLLM-like -> vLLM's model loop on token rows
    (embed, per layer: norms, qkv, rotary kernel, Attention, o_proj, gated MLP, the residual in the fused
    add-and-norm; final norm), kept after the first forward gives HF's output exactly (the body's forward)."""

    name = "body_forward"
    switches = (FUSE_ENV, BODY_ENV)

    def unavailable(self, build: Build) -> Optional[str]:
        if build.is_encoder:
            return "encoder-only model (decoder bodies only)"
        if getattr(build.owner, "pipeline", None) is not None:
            return "pipeline parallel (a rank's body hands hidden states on through HF's forward)"
        return None

    def sites(self, build: Build) -> List[nn.Module]:
        return [build.body]

    def validate(self, body: nn.Module, build: Build) -> Verdict:
        name = type(body).__name__
        layers = decoder_layers(body, build.num_layers)
        if layers is None:
            return Verdict(f"{name} has no single list of {build.num_layers} decoder layers")
        for index, layer in enumerate(layers):
            problem = _layer_problem(layer)
            if problem is None and layer.self_attn.layer_idx != index:
                problem = f"layer {index}'s attention has layer_idx {layer.self_attn.layer_idx}"
            if problem:
                return Verdict(f"{name}: {problem}")
        if not isinstance(body._modules.get("embed_tokens"), nn.Module):
            return Verdict(f"{name} has no embed_tokens")
        if not _is_rms_norm(body._modules.get("norm")):
            return Verdict(f"{name}'s final norm is not a vLLM RMS norm")
        rotary = body._modules.get("rotary_emb")
        if rotary is None or getattr(rotary.__dict__.get("forward"), "table_state", None) is None:
            return Verdict(f"{name} has no rotary_emb answering from a table (rotary_table pass)")
        return Verdict(None, layers)

    def install(self, accepted: Sequence[Tuple[Any, Verdict]], build: Build) -> Tuple[List[Replacement], Any]:
        (body, verdict), = accepted
        lean = LeanBody(body, verdict.data)
        by = ("embed, vLLM's decoder-layer loop on token rows, final norm (kept if the first forward gives HF's "
              "output exactly)")
        return [Replacement(f"{type(body).__name__}.forward", by)], lean


def record_check(reports: Sequence[Any], lean: LeanBody) -> None:
    """The first forward's verdict in the pass's report (what ``doctor`` lists is what runs)."""
    for report in reports:
        if report.name == BodyForward.name and lean.problem:
            report.replacements = []
            report.kept = {lean.problem: 1}


def restore_hf_body(model: Any) -> bool:
    """Makes ``model`` (the backend model) run HF's body forward from now on; whether it ran the lean one."""
    lean: Optional[LeanBody] = getattr(model, "_lean_body", None)
    model._lean_body = None
    return lean is not None and lean.state != "off"
