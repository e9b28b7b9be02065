"""``python -m vllm_transformers_backend check MODEL``: can this model run on the backend, and if not, why.

Nothing is loaded: the HF model is built from its config on the meta device (no vLLM engine, no
weights), its body runs one forward on meta tensors to see which layers call the ``"vllm"`` attention
function, and checkpoint key names come from the safetensors headers (8-byte length + JSON; no tensor
data). Each finding is ``ok``, ``info``, ``warn`` or ``error``; any error means the model cannot run.

Every verdict is the backend's own, reached through its public functions: the build and its error
classification, the body, the attention modules and the encoder/decoder decision (:mod:`.hf_model`), the
tp/pp plans and their lookup (:mod:`.tp_plan`, :mod:`.pipeline`), and the loader's bookkeeping in a dry
run over the header shapes (:func:`.weights.dry_run` with the wrapper class's own mapper, parameter names
and skipped names).

Decode step: not on it (a diagnostic; nothing runs a step).
"""
from __future__ import annotations

import contextlib
import json
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, NoReturn, Optional, Set, Tuple

from . import compat, legacy_attention
from . import hf_model as hf

OK, INFO, WARN, ERROR = "ok", "info", "warn", "error"
#: How many names a table row lists before "... N more".
_SHOWN = 12


@dataclass
class Finding:
    check: str
    status: str
    detail: str
    items: List[str] = field(default_factory=list)


@dataclass
class Report:
    model: str
    tp: int
    pp: int
    architecture: Optional[str] = None
    hf_class: Optional[str] = None
    body_class: Optional[str] = None
    kind: Optional[str] = None  # "decoder" | "encoder"
    runner: Optional[str] = None  # "generate" | "pooling"
    sequence_head: bool = False  # runs with its sequence-classification head
    findings: List[Finding] = field(default_factory=list)
    attention_modules: List[Dict[str, Any]] = field(default_factory=list)
    linears: List[Dict[str, Any]] = field(default_factory=list)
    moe_blocks: List[Dict[str, Any]] = field(default_factory=list)
    checkpoint: Dict[str, Any] = field(default_factory=dict)

    def add(self, check: str, status: str, detail: str, items: Optional[List[str]] = None) -> Finding:
        finding = Finding(check, status, detail, list(items or []))
        self.findings.append(finding)
        return finding

    @property
    def can_run(self) -> bool:
        return not any(f.status == ERROR for f in self.findings)

    def to_dict(self) -> Dict[str, Any]:
        data = asdict(self)
        data["can_run"] = self.can_run
        return data


class _Abort(Exception):
    """A finding that makes the remaining checks meaningless (already recorded)."""


# --- entry point ----------------------------------------------------------------------------------


def run_check(model: str, tp: int = 1, pp: int = 1, trust_remote_code: bool = False) -> Report:
    """Builds the report for ``model`` (a local folder) at the given parallel sizes."""
    report = Report(model=str(model), tp=tp, pp=pp)
    try:
        _check(report, Path(model).expanduser(), tp, pp, trust_remote_code)
    except _Abort:
        pass
    return report


def _check(report: Report, path: Path, tp: int, pp: int, trust_remote_code: bool) -> None:
    if tp < 1 or pp < 1:
        report.add("parallel sizes", ERROR, f"--tp and --pp must be >= 1 (got {tp}, {pp})")
        raise _Abort
    if not path.is_dir():
        report.add("model", ERROR, f"{path} is not a folder; MODEL must be a local checkpoint folder "
                                   "(config.json and weights)")
        raise _Abort

    try:
        compat.check_transformers()
        report.add("transformers", OK, str(compat.transformers_version()))
    except compat.UnsupportedVersionError as exc:
        report.add("transformers", ERROR, str(exc))
        raise _Abort
    if compat.vllm_is_supported():
        report.add("vllm", OK, compat.vllm_version_string())
    else:
        report.add("vllm", ERROR, f"{compat.vllm_version_string()}: the backend needs vLLM {compat.SUPPORTED_VLLM} "
                                  "(or a fork with that base version)")
        raise _Abort
    import vllm  # noqa: F401  (the start-up hook patches it, as in a real run)

    config = _load_config(report, path, trust_remote_code)
    text_config = compat.get_text_config(config)
    report.architecture = (getattr(config, "architectures", None) or [type(config).__name__])[0]
    quantized = _check_quantization(report, config)
    if getattr(config, "is_encoder_decoder", False):
        report.add("model kind", ERROR, "encoder-decoder models (cross-attention) are not supported by the backend")
        raise _Abort

    from .causal import TransformersForCausalLM
    from .pooling import TransformersForEmbedding
    from .sequence_classification import TransformersForSequenceClassification

    report.sequence_head = _sequence_head(report, config)
    first = TransformersForSequenceClassification if report.sequence_head else TransformersForCausalLM
    hf_model, interface_error, auto_class = _build(report, config, first.hf_auto_class, trust_remote_code)
    kind = hf.model_kind(hf_model)
    if kind.kind == "encoder" and not report.sequence_head and auto_class != TransformersForEmbedding.hf_auto_class:
        # Encoders run as pooling models built from AutoModel (no LM head).
        hf_model, interface_error, auto_class = _build(report, config, TransformersForEmbedding.hf_auto_class,
                                                       trust_remote_code)
    prefix, body = hf.base_model_of(hf_model)
    report.hf_class, report.body_class = type(hf_model).__name__, type(body).__name__
    _report_kind(report, kind)
    _check_attention(report, hf_model, body, text_config, interface_error)
    _check_sliding_windows(report, text_config)
    from .pipeline import collect_pp_plan
    from .tp_plan import collect_tp_plan

    # the same plans the backend uses (config class defaults, body and top-model class plans)
    _check_tensor_parallel(report, body, collect_tp_plan(hf_model, body, prefix, text_config), text_config, tp)
    _check_pipeline_parallel(report, body, collect_pp_plan(hf_model, body, prefix, text_config), text_config, pp,
                             kind.kind)
    wrapper = (TransformersForSequenceClassification if report.sequence_head
               else TransformersForEmbedding if kind.kind == "encoder" else TransformersForCausalLM)
    blocks = _check_moe(report, body, tp, quantized)
    _check_checkpoint(report, path, wrapper, hf_model, body, prefix, config, quantized, blocks)


# --- config, quantization, build --------------------------------------------------------------------


def _load_config(report: Report, path: Path, trust_remote_code: bool) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except Exception as exc:  # a config that does not load is the finding
        hint = " (pass --trust-remote-code for models with their own code)" if "trust_remote_code" in str(exc) else ""
        report.add("config", ERROR, f"{type(exc).__name__}: {exc}{hint}")
        raise _Abort


def _sequence_head(report: Report, config: Any) -> bool:
    """Whether the checkpoint runs with its sequence-classification head (classify / score / reward);
    token-classification heads are refused, as the backend refuses them."""
    from .options import pooling_task

    try:
        return pooling_task(None, list(getattr(config, "architectures", None) or [])) != "embed"
    except ValueError as exc:
        report.add("model kind", ERROR, str(exc))
        raise _Abort


def _check_quantization(report: Report, config: Any) -> bool:
    quant = getattr(config, "quantization_config", None)
    if not quant:
        report.add("quantization", OK, "none")
        return False
    method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
    method = str(getattr(method, "value", method) or "unknown").lower()
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS

    from .quantization import REFUSED_METHODS, TESTED_METHODS

    gpu_only = "needs a CUDA GPU (vLLM 0.6.2's quantized kernels; the CPU engine refuses it)"
    if method in REFUSED_METHODS:
        report.add("quantization", ERROR, f"{method}: not supported by the backend: {REFUSED_METHODS[method]}")
    elif method in TESTED_METHODS:
        report.add("quantization", OK, f"{method}: runs in the backend's vLLM layers (fused q/k/v and gate/up "
                                       f"included), compared with native vLLM by the GPU tests; {gpu_only}")
    elif method in QUANTIZATION_METHODS:
        report.add("quantization", WARN, f"{method}: vLLM 0.6.2 implements it and the backend hands vLLM's "
                                         f"quant_config to its layers; not covered by the backend's tests; {gpu_only}")
    else:
        report.add("quantization", ERROR, f"{method}: vLLM 0.6.2 does not implement this method (it knows: "
                                          f"{', '.join(sorted(QUANTIZATION_METHODS))})")
    return True


def _build(report: Report, config: Any, auto_class: str, trust_remote_code: bool) -> Tuple[Any, Optional[str], str]:
    """The HF model on meta as the backend builds it (``attn_implementation="vllm"``, the backend's own build
    and error classification); when the model cannot take that implementation, built with "eager" for the
    rest of the report and the backend's reason returned. Also returns the auto class that built it (a
    model without a causal-LM class is built as ``AutoModel``)."""
    from .attention import register_attention_function

    register_attention_function()
    try:
        return _build_on_meta(config, auto_class, trust_remote_code, hf.ATTN_IMPLEMENTATION), None, auto_class
    except hf.NoAutoClassError as exc:
        if auto_class != "AutoModel":
            return _build(report, config, "AutoModel", trust_remote_code)
        _build_failed(report, exc, auto_class)
    except hf.AttentionInterfaceError as exc:
        interface_error = str(exc)
    except Exception as exc:
        _build_failed(report, exc, auto_class)
    try:
        return _build_on_meta(config, auto_class, trust_remote_code, "eager"), interface_error, auto_class
    except Exception as exc:
        _build_failed(report, exc, auto_class)


def _build_failed(report: Report, exc: Exception, auto_class: str) -> NoReturn:
    report.add("build", ERROR, f"{auto_class}.from_config on the meta device failed: {type(exc).__name__}: {exc}")
    raise _Abort


def _build_on_meta(config: Any, auto_class: str, trust_remote_code: bool, attn_implementation: str) -> Any:
    """:func:`.hf_model.build` (on a copy of ``config``) with everything on the meta device: buffers too, or,
    where a constructor computes buffers with data-dependent ops, built as the backend builds (buffers real,
    on the CPU) and then moved to meta."""
    import copy

    import torch

    def build() -> Any:
        return hf.build(copy.deepcopy(config), auto_class, dtype=torch.get_default_dtype(),
                        trust_remote_code=trust_remote_code, attn_implementation=attn_implementation)

    try:
        with torch.device("meta"):
            return build()
    except hf.BackendError:
        raise
    except Exception:
        pass
    with torch.device("cpu"):
        return build().to("meta")


# --- attention and model kind ------------------------------------------------------------------------


def _report_kind(report: Report, kind: Any) -> None:
    report.kind = kind.kind
    if kind.kind == "mixed":
        report.add("model kind", ERROR, f"mixes causal and bidirectional attention layers ({kind.evidence}); the "
                                        "backend runs decoder-only or encoder-only models")
        return
    if report.sequence_head and kind.kind in ("decoder", "encoder"):
        report.runner = "pooling"
        from .sequence_classification import TransformersForSequenceClassification

        report.add("model kind", OK, f"{kind.kind} ({kind.evidence}) with a sequence-classification head: runs as "
                                     f"{TransformersForSequenceClassification.__name__} (task classify / score / "
                                     "reward: LLM.classify, LLM.score, LLM.reward, /classify, /score, /rerank)")
        return
    from .causal import TransformersForCausalLM
    from .pooling import TransformersForEmbedding

    if kind.kind == "decoder":
        report.runner = "generate"
        report.add("model kind", OK, f"decoder ({kind.evidence}): runs as {TransformersForCausalLM.__name__} "
                                     "(LLM.generate)")
        return
    report.runner = "pooling"
    report.add("model kind", OK, f"encoder ({kind.evidence}): runs as {TransformersForEmbedding.__name__} with the "
                                 "pooling runner (runner='pooling', LLM.embed), not generate")


def _check_attention(report: Report, hf_model: Any, body: Any, text_config: Any, interface_error: Optional[str]) -> None:
    flag = getattr(type(hf_model), "_supports_attention_backend", None)
    modules = hf.attention_modules(body)
    called = None if interface_error else _probe_dispatch(report, body, encoder=report.kind == "encoder")
    groups: Dict[str, Dict[str, Any]] = {}
    for name, module in modules:
        entry = groups.setdefault(type(module).__name__, {"class": type(module).__name__, "layers": [], "names": [],
                                                          "is_causal": getattr(module, "is_causal", None)})
        entry["layers"].append(module.layer_idx)
        entry["names"].append(name)
    for entry in groups.values():
        entry["called_vllm"] = None if called is None else sorted(set(entry["layers"]) & called)
    report.attention_modules = list(groups.values())
    rows = [f"{g['class']} x{len(g['layers'])} (is_causal={g['is_causal']}, called 'vllm': "
            f"{'n/a' if g['called_vllm'] is None else len(g['called_vllm'])})" for g in groups.values()]

    if not interface_error:
        try:
            hf.check_attention_backend_support(hf_model)
        except hf.AttentionInterfaceError as exc:
            interface_error = str(exc)
    if interface_error:
        report.add("attention interface", ERROR, interface_error, rows)
        return
    if not modules:
        report.add("attention interface", ERROR, "no attention module carries an integer layer_idx, which the "
                   "'vllm' attention function uses to find the layer's KV cache")
        return
    num_layers = getattr(text_config, "num_hidden_layers", None) or len(modules)
    expected = set(range(num_layers))
    how = "_supports_attention_backend " + ("not declared" if flag is None else str(flag))
    if any(legacy_attention.is_routed(module) for _, module in modules):
        how = (f"transformers {compat.transformers_version()} predates the interface for this model: its SDPA "
               "classes' scaled_dot_product_attention call is routed to it")
    if called is None:
        report.add("attention interface", WARN, f"{how}; dispatch not verified on meta (the backend checks it on "
                   "its first forward)", rows)
    elif called != expected:
        report.add("attention interface", ERROR, hf.undispatched_layers(sorted(expected - called)), rows)
    else:
        report.add("attention interface", OK, f"all {len(expected)} layers call the 'vllm' attention function "
                   f"({how})", rows)


def _check_sliding_windows(report: Report, text_config: Any) -> None:
    """The windows the backend applies, per layer type (sliding_window.py decides the same way at load)."""
    from .sliding_window import SlidingWindowError, describe, layer_windows, needs_per_layer, vllm_global_window

    try:
        windows = layer_windows(text_config)
    except SlidingWindowError as exc:
        report.add("sliding window", ERROR, str(exc))
        return
    vllm_window = vllm_global_window(text_config)
    if not any(windows) and vllm_window is None:
        return
    rows = describe(windows, getattr(text_config, "layer_types", None))
    shortest = min((w for w in windows if w), default=None)
    if not needs_per_layer(windows, vllm_window):
        detail, status = f"one window ({shortest}) for every layer: vLLM's own sliding-window mechanism applies it", OK
    elif shortest is None:
        detail, status = (f"no layer slides, though vLLM would apply its window ({vllm_window}) to every layer: the "
                          "backend turns vLLM's window off"), OK
    elif report.kind == "encoder":
        detail, status = (f"bidirectional layers with a window ({shortest}): the backend's encoder attention has "
                          f"none, so it runs only at max_model_len <= {shortest}"), WARN
    else:
        detail, status = ("per layer, at the model's full context: vLLM's engine-wide window is off (the KV cache "
                          "keeps every token); a layer whose window is shorter than max_model_len attends through "
                          "FlashAttention's window (CUDA, bf16/fp16) or the backend's attention over vLLM's paged "
                          "cache (XFormers, the CPU); other attention backends (FlashInfer) need max_model_len <= "
                          f"{shortest}"), OK
    report.add("sliding window", status, detail, rows)


def _probe_dispatch(report: Report, body: Any, encoder: bool) -> Optional[Set[int]]:
    """Runs the body once on meta tensors with the inputs the backend passes, recording which layers
    reached the ``"vllm"`` attention function. None when the forward cannot run on meta (no verdict)."""
    import torch

    from .attention import AttentionContext, attention_context

    class _AnyLayer(dict):
        def __missing__(self, idx: int) -> Any:  # stands in for each layer's vLLM Attention
            return lambda q, k, v, kv_cache, metadata: torch.empty_like(q)

    class _NoCaches(list):
        def __getitem__(self, idx: Any) -> None:
            return None

    ctx = AttentionContext(_AnyLayer(), _NoCaches(), None, record_calls=True)
    tokens = 4
    try:
        with torch.device("meta"), torch.no_grad(), _autocast_tolerates_meta(), attention_context(ctx):
            input_ids = torch.zeros(1, tokens, dtype=torch.long)
            if encoder:  # as Base._encoder_forward: a padded batch with its mask, HF's own positions
                kwargs = dict(input_ids=input_ids, attention_mask=torch.ones(1, tokens, dtype=torch.long))
            else:  # as Base.forward
                kwargs = dict(input_ids=input_ids, position_ids=torch.arange(tokens)[None], use_cache=False)
            body(**kwargs, return_dict=False)
    except TypeError as exc:
        if "unexpected keyword argument" in str(exc):
            report.add("forward signature", ERROR, f"{type(body).__name__}.forward does not take what the backend "
                       f"passes ({', '.join(kwargs)}, return_dict): {exc}")
        return None
    except Exception:  # ops without a meta kernel, data-dependent code: no verdict
        return None
    return set(ctx.called or ())


@contextlib.contextmanager
def _autocast_tolerates_meta() -> Iterator[None]:
    """HF rotary code opens ``torch.autocast(device_type=x.device.type)``, which refuses "meta"."""
    import torch

    original = torch.autocast

    class _Autocast(original):  # type: ignore[misc, valid-type]
        def __init__(self, device_type: str, *args: Any, **kwargs: Any) -> None:
            self._on_meta = device_type == "meta"
            if not self._on_meta:
                super().__init__(device_type, *args, **kwargs)

        def __enter__(self) -> Any:
            return None if self._on_meta else super().__enter__()

        def __exit__(self, *exc: Any) -> Any:
            return None if self._on_meta else super().__exit__(*exc)

    torch.autocast = _Autocast
    try:
        yield
    finally:
        torch.autocast = original


# --- tensor and pipeline parallelism ------------------------------------------------------------------


def _check_tensor_parallel(report: Report, body: Any, plan: Dict[str, str], text_config: Any, tp: int) -> None:
    """The backend's own plan lookup (:class:`.tp_plan.TPPlan`: a tensor's entry before its module's) and
    style table, over the linears the backend replaces."""
    from .layers import KNOWN_LINEAR_STYLES, UnsupportedTPStyleError
    from .tp_plan import TPPlan, uses_later_release_plan

    lookup = TPPlan(plan)
    uncovered, unknown, indivisible = [], [], []
    for name, module in body.named_modules():
        if not hf.is_linear(module):
            continue
        in_features, out_features = hf.linear_features(module)
        style = lookup.style_of(name)
        report.linears.append({"name": name, "in_features": in_features, "out_features": out_features,
                               "style": style})
        if style is None:
            uncovered.append(name)
        elif style not in KNOWN_LINEAR_STYLES:
            unknown.append(f"{name}: {style!r}")
        elif tp > 1:
            sharded = out_features if "col" in style else in_features if "row" in style else None
            if sharded is not None and sharded % tp:
                indivisible.append(f"{name} ({style}: {sharded} features)")
    total = len(report.linears)
    covered = total - len(uncovered)
    if tp == 1:
        report.add("tensor parallel", OK, f"TP=1: nothing sharded; tp_plan covers {covered}/{total} linears "
                   "for TP>1" if plan else "TP=1: nothing sharded (no tp_plan: TP>1 would be refused)")
        return
    try:
        if lookup:  # the styles of modules the backend keeps whole, as it checks them
            lookup.check_unreplaced(body, hf.is_linear, body.get_input_embeddings())
        unreplaceable = None
    except UnsupportedTPStyleError as exc:
        unreplaceable = str(exc)
    if not plan:
        report.add("tensor parallel", ERROR, f"{report.body_class} has no tp_plan, so it cannot be sharded over "
                   f"{tp} ranks. Fix: add `base_model_tp_plan` to its config (or `_tp_plan` to the model class), "
                   "mapping each linear's name pattern to 'colwise'/'rowwise', or run with --tp 1")
    elif unknown:
        report.add("tensor parallel", ERROR, f"tp_plan styles without a vLLM equivalent (known: "
                   f"{', '.join(sorted(KNOWN_LINEAR_STYLES))})", unknown)
    elif unreplaceable:
        report.add("tensor parallel", ERROR, unreplaceable)
    elif indivisible:
        report.add("tensor parallel", ERROR, f"sharded dimensions not divisible by TP={tp}", indivisible)
    elif uncovered:
        report.add("tensor parallel", WARN, f"tp_plan covers {covered}/{total} linears; the other {len(uncovered)} "
                   f"have no style and are replicated on every rank (correct, not sharded)", uncovered)
    else:
        report.add("tensor parallel", OK, f"tp_plan covers all {total} linears at TP={tp}")
    if plan and uses_later_release_plan(text_config):
        finding = report.findings[-1]
        finding.detail += (f" (transformers {compat.transformers_version()} declares no tp_plan for "
                           f"{text_config.model_type}: the backend uses the one a later release declares)")
    _check_heads(report, text_config, tp)


def _check_heads(report: Report, text_config: Any, tp: int) -> None:
    heads = getattr(text_config, "num_attention_heads", None)
    kv_heads = next((getattr(text_config, a) for a in ("num_key_value_heads", "n_head_kv", "num_kv_heads")
                     if isinstance(getattr(text_config, a, None), int)), heads)
    if not isinstance(heads, int):
        report.add("attention heads", WARN, "num_attention_heads not found in the config; not checked")
        return
    if heads % tp:
        report.add("attention heads", ERROR, f"{heads} attention heads are not divisible by TP={tp}")
    elif kv_heads >= tp and kv_heads % tp:
        report.add("attention heads", ERROR, f"{kv_heads} KV heads are not divisible by TP={tp}")
    elif kv_heads < tp and tp % kv_heads:
        report.add("attention heads", ERROR, f"TP={tp} is not a multiple of the {kv_heads} KV heads (each KV head "
                                             "must be replicated on a whole number of ranks)")
    elif kv_heads < tp:
        report.add("attention heads", OK, f"per rank: {heads // tp} of {heads} attention heads, 1 KV head "
                                          f"(only {kv_heads} KV for TP={tp}: replicated)")
    else:
        report.add("attention heads", OK, f"per rank: {heads // tp} of {heads} attention heads, {kv_heads // tp} "
                                          f"of {kv_heads} KV heads")


def _check_pipeline_parallel(report: Report, body: Any, plan: Dict[str, Any], text_config: Any, pp: int,
                             kind: str) -> None:
    if pp == 1:
        return
    if kind != "decoder":
        report.add("pipeline parallel", ERROR, "this version of the backend does not implement pipeline "
                   f"parallelism for {kind} models; run with --pp 1")
        return
    if not plan:
        report.add("pipeline parallel", ERROR, f"{report.body_class} has no pp_plan, so its layers cannot be split "
                   f"over {pp} stages. Fix: add `base_model_pp_plan` to its config (or `_pp_plan` to the model "
                   "class), or run with --pp 1")
        return
    from .pipeline import PipelineError, plan_modules

    num_layers = getattr(text_config, "num_hidden_layers", 0)
    try:
        plan_modules(body, plan, num_layers)  # as the backend splits the body
    except PipelineError as exc:
        report.add("pipeline parallel", ERROR, str(exc))
        return
    if num_layers < pp:
        report.add("pipeline parallel", ERROR, f"{num_layers} layers cannot fill {pp} pipeline stages")
    elif num_layers % pp:
        report.add("pipeline parallel", WARN, f"{num_layers} layers are not divisible by PP={pp}: vLLM gives the "
                   "last stage the remainder (or set VLLM_PP_LAYER_PARTITION)")
    else:
        report.add("pipeline parallel", OK, f"pp_plan ({', '.join(plan)}); {num_layers // pp} layers per stage")


# --- mixture of experts -------------------------------------------------------------------------------


def _check_moe(report: Report, body: Any, tp: int, quantized: bool) -> List[Any]:
    """Which path each mixture-of-experts block takes (:mod:`.moe`) and why; its experts at ``tp``."""
    from .moe import MOE_ENV, find_moe_blocks, qualify_for_fused, routing_description

    blocks = find_moe_blocks(body)
    if not blocks:
        return []
    groups: Dict[tuple, List[Any]] = {}
    for block in blocks:
        shape = block.layout.shape
        key = (type(block.module).__name__, block.layout.kind, block.layout.class_name, shape.num_experts,
               shape.intermediate_size, block.top_k, block.shared_attr, block.shared_gate_attr)
        groups.setdefault(key, []).append(block)
    rows, problems = [], []
    for (cls, kind, experts_cls, num, inter, top_k, shared, gate), members in groups.items():
        spec, problem = qualify_for_fused(members[0])
        shared_text = f", {'gated ' if gate else ''}shared expert" if shared else ""
        routing = problem or routing_description(members[0], spec)
        rows.append(f"{cls} x{len(members)}: {num} experts ({kind}, {experts_cls}), top-{top_k or '?'}, "
                    f"intermediate {inter}{shared_text}; {'HF loop: ' if problem else 'FusedMoE: '}{routing}")
        report.moe_blocks.append({"class": cls, "blocks": [b.qualname for b in members], "layout": kind,
                                  "experts_class": experts_cls, "num_experts": num, "intermediate_size": inter,
                                  "top_k": top_k, "shared_expert": shared, "shared_expert_gate": gate,
                                  "fused": problem is None and not quantized, "routing": routing})
        if problem:
            problems.append(f"{cls}: {problem}")
    indivisible = sorted({b.layout.shape.intermediate_size for b in blocks if b.layout.shape.intermediate_size % tp})
    if indivisible:
        report.add("mixture of experts", ERROR, f"experts' intermediate size {indivisible[0]} is not divisible by "
                   f"TP={tp} (tensor parallelism splits every expert's intermediate size)", rows)
        return blocks
    sharding = f"; at TP={tp} each rank holds 1/{tp} of every expert's intermediate size" if tp > 1 else ""
    if sharding and any(b.layout.kind == "per-expert" for b in blocks):
        sharding += " (FusedMoE; where HF's code runs, its per-expert linears follow the tp_plan)"
    if quantized:
        report.add("mixture of experts", WARN, f"{len(blocks)} MoE blocks run HF's expert code: the FusedMoE path "
                   "loads unquantized experts only (on CUDA that loop needs enforce_eager=True)" + sharding, rows)
    elif problems:
        report.add("mixture of experts", WARN, f"{len(blocks)} MoE blocks; HF's expert loop runs everywhere for "
                   f"{'; '.join(problems)} (on CUDA that loop needs enforce_eager=True)" + sharding, rows)
    else:
        report.add("mixture of experts", OK, f"{len(blocks)} MoE blocks: on CUDA one vLLM FusedMoE per block fed "
                   "with HF's routing; on the CPU engine and other devices HF's expert code "
                   f"({MOE_ENV}=hf keeps HF's code everywhere)" + sharding, rows)
    return blocks


# --- checkpoint keys ----------------------------------------------------------------------------------


def safetensors_header(path: Path) -> Dict[str, Any]:
    """The JSON header of a safetensors file (tensor names, dtypes, shapes); no tensor data is read."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    return header


def checkpoint_tensors(path: Path) -> Tuple[str, Optional[Dict[str, Optional[Tuple[int, ...]]]]]:
    """``(format, {key: shape or None})`` from safetensors headers (files named by the index, or every
    ``*.safetensors``); ``("bin", None)`` for pickled checkpoints, ``("none", None)`` without weights."""
    index = path / "model.safetensors.index.json"
    files = sorted(path.glob("*.safetensors"))
    tensors: Dict[str, Optional[Tuple[int, ...]]] = {}
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = [path / name for name in sorted(set(weight_map.values()))]
        tensors.update({key: None for key in weight_map})
    if files:
        for file in files:
            if file.is_file():
                tensors.update({k: tuple(v.get("shape", ())) for k, v in safetensors_header(file).items()})
        return "safetensors", tensors
    if any(path.glob(pattern) for pattern in ("*.bin", "*.pt", "*.pth")):
        return "bin", None
    return "none", None


def _check_checkpoint(report: Report, path: Path, wrapper: Any, hf_model: Any, body: Any, prefix: str, config: Any,
                      quantized: bool, moe_blocks: List[Any]) -> None:
    """The backend's loader in a dry run over the checkpoint's headers: the wrapper's own mapper, parameter
    names and skipped names, against the HF model's (unsharded, unfused) parameters on meta; expert tensors through the
    backend's expert loader (either checkpoint layout into the model's), shapes only."""
    from .moe import expert_tensors
    from .weights import WeightsLoadingError, dry_run

    fmt, tensors = checkpoint_tensors(path)
    report.checkpoint = {"format": fmt, "keys": None if tensors is None else len(tensors), "unmapped": [],
                         "missing": [], "shape_mismatch": []}
    if fmt == "bin":
        report.add("checkpoint keys", WARN, "pickled .bin checkpoint: its keys cannot be listed without loading it; "
                   "not checked (convert to safetensors to check)")
        return
    if tensors is None:
        report.add("checkpoint keys", ERROR, f"no weights found in {path} (*.safetensors or *.bin)")
        return
    if quantized:
        report.add("checkpoint keys", INFO, "not checked: quantized checkpoints hold the method's own tensors "
                   "(qweight, scales, ...), which only vLLM's quantized layers define")
        return
    target = wrapper.checkpoint_target(hf_model, body)
    mapper = wrapper.checkpoint_mapper(hf_model, prefix, body)
    skip = wrapper.skipped_weights(config)
    experts = expert_tensors(target, moe_blocks)
    try:
        account = dry_run(target, sorted(tensors.items()), mapper, skip=skip, consumers=[experts] if experts else [])
    except WeightsLoadingError as exc:
        report.add("checkpoint keys", ERROR, str(exc))
        return
    mismatched = [f"{key} {list(shape)} -> {name} {list(expected)}" for key, shape, name, expected in account.mismatched]
    mismatched += experts.errors or []
    unmapped, missing = account.unmapped, account.missing
    report.checkpoint.update(unmapped=unmapped, missing=missing, shape_mismatch=mismatched)
    if unmapped:
        report.add("checkpoint keys", ERROR, f"{len(unmapped)} of {len(tensors)} checkpoint tensors map to no "
                   "parameter (the checkpoint does not match the architecture, or needs a renaming rule)", unmapped)
    if missing:
        report.add("checkpoint coverage", ERROR, f"{len(missing)} parameters get no tensor from the checkpoint",
                   missing)
    if mismatched:
        report.add("checkpoint shapes", ERROR, f"{len(mismatched)} tensors do not fit their parameter", mismatched)
    if not (unmapped or missing or mismatched):
        excused = len(account.excused)
        layouts = " and ".join(sorted(experts.layouts()))
        report.add("checkpoint keys", OK, f"all {len(tensors) - excused} {fmt} tensors map to the backend's "
                   f"parameters ({len(account.loaded)} filled{', lm_head tied' if skip else ''}"
                   + (f"; experts of {len(moe_blocks)} MoE blocks complete, {layouts} in the checkpoint" if moe_blocks
                      else "") + ")"
                   + (f"; {excused} tensors {wrapper.__name__} does not use (task heads, HF's pooler, keys its "
                      "model class ignores) are skipped" if excused else ""))


# --- output ---------------------------------------------------------------------------------------------


def format_report(report: Report) -> str:
    lines = [f"model         {report.model}"]
    if report.architecture:
        lines.append(f"architecture  {report.architecture} (HF class {report.hf_class}, body {report.body_class})")
    lines.append(f"parallel      TP={report.tp} PP={report.pp}")
    if report.kind:
        lines.append(f"kind          {report.kind} -> {report.runner} runner")
    lines.append("")
    width = max([len(f.check) for f in report.findings] + [5])
    lines.append(f"{'CHECK':<{width}}  STATUS  DETAIL")
    for f in report.findings:
        lines.append(f"{f.check:<{width}}  {f.status.upper():<6}  {f.detail}")
        for item in f.items[:_SHOWN]:
            lines.append(f"{'':<{width}}          - {item}")
        if len(f.items) > _SHOWN:
            lines.append(f"{'':<{width}}          ... {len(f.items) - _SHOWN} more (--json lists all)")
    errors = sum(f.status == ERROR for f in report.findings)
    lines.append("")
    lines.append("RESULT: can run on the Transformers backend" if report.can_run
                 else f"RESULT: cannot run on the Transformers backend ({errors} error{'s' if errors > 1 else ''})")
    return "\n".join(lines)


def main(model: str, tp: int = 1, pp: int = 1, trust_remote_code: bool = False, as_json: bool = False) -> int:
    """Prints the report; 0 when the model can run, 1 when it cannot."""
    import sys

    # Libraries log to stdout (vLLM's default handler); keep stdout for the report alone.
    with contextlib.redirect_stdout(sys.stderr):
        report = run_check(model, tp=tp, pp=pp, trust_remote_code=trust_remote_code)
    print(json.dumps(report.to_dict(), indent=2) if as_json else format_report(report))
    return 0 if report.can_run else 1
