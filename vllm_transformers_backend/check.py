"""``python -m vllm_transformers_backend check MODEL``: can this model run on the backend, and if not, why.

Nothing is loaded: the HF model is built from its config on the meta device (no vLLM engine, no
weights), its body runs one forward on meta tensors to see which layers call the ``"vllm"`` attention
function, and checkpoint key names come from the safetensors headers (8-byte length + JSON; no tensor
data). Each finding is ``ok``, ``info``, ``warn`` or ``error``; any error means the model cannot run.
"""
from __future__ import annotations

import contextlib
import json
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, NoReturn, Optional, Set, Tuple

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
    from . import compat

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

    report.sequence_head = _sequence_head(report, config)
    auto_class = "AutoModelForSequenceClassification" if report.sequence_head else "AutoModelForCausalLM"
    hf_model, interface_error = _build(report, config, auto_class, trust_remote_code)
    kind, kind_detail = _model_kind(hf_model)
    if kind == "encoder" and not report.sequence_head and \
            type(hf_model).__name__ != _auto_class_name(config, "AutoModel"):
        # Encoders run as pooling models built from AutoModel (no LM head).
        hf_model, interface_error = _build(report, config, "AutoModel", trust_remote_code)
    from .base import Base

    prefix, body = Base._base_model_of(hf_model)
    report.hf_class, report.body_class = type(hf_model).__name__, type(body).__name__
    _report_kind(report, kind, kind_detail)
    _check_attention(report, hf_model, body, text_config, interface_error)
    _check_sliding_windows(report, text_config)
    from .pipeline import collect_pp_plan
    from .tp_plan import collect_tp_plan

    # the same plans the backend uses (config class defaults, body and top-model class plans)
    _check_tensor_parallel(report, body, collect_tp_plan(hf_model, body, prefix, text_config), text_config, tp)
    _check_pipeline_parallel(report, body, collect_pp_plan(hf_model, body, prefix, text_config), text_config, pp, kind)
    _check_checkpoint(report, path, hf_model, body, prefix, config, quantized)


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


def _auto_class_name(config: Any, auto_class: str) -> Optional[str]:
    import transformers

    mapping = getattr(transformers, auto_class)._model_mapping
    try:
        return mapping[type(config)].__name__
    except (KeyError, ValueError):
        return None


def _build(report: Report, config: Any, auto_class: str, trust_remote_code: bool) -> Tuple[Any, Optional[str]]:
    """The HF model on meta with ``attn_implementation="vllm"`` (as the backend builds it); when the
    model cannot take that implementation, built with "eager" for the rest of the report, and the
    reason returned."""
    import transformers

    from .attention import ATTN_IMPLEMENTATION, register_attention_function

    register_attention_function()
    auto = getattr(transformers, auto_class)
    interface_error = None
    try:
        return _from_config(auto, config, ATTN_IMPLEMENTATION, trust_remote_code), None
    except KeyError as exc:
        if exc.args != (ATTN_IMPLEMENTATION,):
            _build_failed(report, exc, auto_class)
        interface_error = "its attention classes are looked up by implementation name (KeyError 'vllm')"
    except ValueError as exc:
        message = str(exc)
        if "Unrecognized configuration class" in message and auto_class != "AutoModel":
            return _build(report, config, "AutoModel", trust_remote_code)
        if "attn_implementation" not in message and "attention" not in message.lower():
            _build_failed(report, exc, auto_class)
        interface_error = f"attn_implementation='vllm' refused: {message}"
    except Exception as exc:
        _build_failed(report, exc, auto_class)
    try:
        return _from_config(auto, config, "eager", trust_remote_code), interface_error
    except Exception as exc:
        _build_failed(report, exc, auto_class)


def _build_failed(report: Report, exc: Exception, auto_class: str) -> NoReturn:
    report.add("build", ERROR, f"{auto_class}.from_config on the meta device failed: {type(exc).__name__}: {exc}")
    raise _Abort


def _from_config(auto: Any, config: Any, attn_implementation: str, trust_remote_code: bool) -> Any:
    import copy

    import torch

    from .base import parameters_on_meta

    config = copy.deepcopy(config)
    config._attn_implementation = attn_implementation
    kwargs = dict(trust_remote_code=trust_remote_code, attn_implementation=attn_implementation)
    try:
        with torch.device("meta"):
            return auto.from_config(config, **kwargs)
    except Exception as exc:
        if isinstance(exc, KeyError) or "Unrecognized configuration class" in str(exc):
            raise
    # Some constructors compute buffers with data-dependent ops: build as the backend does (parameters
    # on meta, buffers real on the CPU), then move the buffers to meta too.
    with torch.device("cpu"), parameters_on_meta():
        return auto.from_config(config, **kwargs).to("meta")


# --- attention and model kind ------------------------------------------------------------------------


def _attention_modules(body: Any) -> List[Tuple[str, Any]]:
    """Attention modules as the backend finds them (``layer_idx`` and "attention" in the class name);
    else the innermost modules carrying a ``layer_idx`` (custom code calls them anything)."""
    from .base import named_attention_modules

    found = named_attention_modules(body)
    if found:
        return found
    carriers = [(n, m) for n, m in body.named_modules() if isinstance(getattr(m, "layer_idx", None), int)]
    return [(n, m) for n, m in carriers
            if not any(c is not m and isinstance(getattr(c, "layer_idx", None), int) for c in m.modules())]


def _attention_like(hf_model: Any) -> List[Any]:
    """Innermost modules whose class name says attention (for models without ``layer_idx``)."""
    named = [m for m in hf_model.modules() if "attention" in type(m).__name__.lower()]
    return [m for m in named if not any(c is not m and "attention" in type(c).__name__.lower() for c in m.modules())]


def _model_kind(hf_model: Any) -> Tuple[str, str]:
    """``("encoder" | "decoder" | "mixed", evidence)`` as the backend decides: attention modules with
    ``is_causal=False`` make an encoder. Older BERT-style code has no ``is_causal`` but ``is_decoder``."""
    modules = [m for _, m in _attention_modules(hf_model)] or _attention_like(hf_model)
    flags = {type(m).__name__: getattr(m, "is_causal") for m in modules if isinstance(getattr(m, "is_causal", None), bool)}
    if flags:
        if len(set(flags.values())) > 1:
            return "mixed", "is_causal=True and False: " + ", ".join(f"{c}={f}" for c, f in sorted(flags.items()))
        if not any(flags.values()):
            return "encoder", "is_causal=False on " + ", ".join(sorted(flags))
        return "decoder", "is_causal=True on " + ", ".join(sorted(flags))
    decoder = {type(m).__name__: getattr(m, "is_decoder") for m in modules if isinstance(getattr(m, "is_decoder", None), bool)}
    if decoder and not any(decoder.values()):
        return "encoder", "no is_causal; is_decoder=False on " + ", ".join(sorted(decoder))
    return "decoder", "no attention module says is_causal=False"


def _report_kind(report: Report, kind: str, evidence: str) -> None:
    report.kind = kind
    if kind == "mixed":
        report.add("model kind", ERROR, f"mixes causal and bidirectional attention layers ({evidence}); the backend "
                                        "runs decoder-only or encoder-only models")
        return
    if report.sequence_head and kind in ("decoder", "encoder"):
        report.runner = "pooling"
        from .sequence_classification import TransformersForSequenceClassification

        report.add("model kind", OK, f"{kind} ({evidence}) with a sequence-classification head: runs as "
                                     f"{TransformersForSequenceClassification.__name__} (task classify / score / "
                                     "reward: LLM.classify, LLM.score, LLM.reward, /classify, /score, /rerank)")
        return
    if kind == "decoder":
        report.runner = "generate"
        report.add("model kind", OK, f"decoder ({evidence}): runs as TransformersForCausalLM (LLM.generate)")
        return
    report.runner = "pooling"
    from .pooling import TransformersForEmbedding

    report.add("model kind", OK, f"encoder ({evidence}): runs as {TransformersForEmbedding.__name__} with the "
                                 "pooling runner (runner='pooling', LLM.embed), not generate")


def _check_attention(report: Report, hf_model: Any, body: Any, text_config: Any, interface_error: Optional[str]) -> None:
    flag = getattr(type(hf_model), "_supports_attention_backend", None)
    modules = _attention_modules(body)
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

    if interface_error:
        report.add("attention interface", ERROR, f"{report.architecture} cannot use the attention interface in "
                   f"transformers {_tf_version()}: {interface_error}. Fix: upgrade transformers, or use "
                   "model_impl='vllm' if vLLM has the architecture." + _interface_hint(hf_model), rows)
        return
    if flag is False:
        report.add("attention interface", ERROR, f"{type(hf_model).__name__}._supports_attention_backend is False: "
                   "its attention bypasses ALL_ATTENTION_FUNCTIONS", rows)
        return
    if not modules:
        report.add("attention interface", ERROR, "no attention module carries an integer layer_idx, which the "
                   "'vllm' attention function uses to find the layer's KV cache")
        return
    num_layers = getattr(text_config, "num_hidden_layers", None) or len(modules)
    expected = set(range(num_layers))
    flag_text = "not declared" if flag is None else str(flag)
    if called is None:
        report.add("attention interface", WARN, f"_supports_attention_backend {flag_text}; dispatch not verified "
                   "on meta (the backend checks it on its first forward)", rows)
    elif called != expected:
        missing = sorted(expected - called)
        report.add("attention interface", ERROR, f"layers {_preview(missing)} did not call the 'vllm' attention "
                   "function (their modules ignore config._attn_implementation or drop **kwargs)", rows)
    else:
        report.add("attention interface", OK, f"all {len(expected)} layers call the 'vllm' attention function "
                   f"(_supports_attention_backend {flag_text})", rows)


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


def _interface_hint(hf_model: Any) -> str:
    from . import compat

    hint = getattr(compat, "attention_interface_hint", None)  # the release that fixes it, where known
    return hint(getattr(hf_model.config, "model_type", None)) if hint else ""


def _tf_version() -> str:
    from . import compat

    return str(compat.transformers_version())


# --- tensor and pipeline parallelism ------------------------------------------------------------------


def _linears(body: Any) -> List[Tuple[str, int, int]]:
    from torch import nn

    from .base import _is_conv1d

    found = []
    for name, module in body.named_modules():
        if isinstance(module, nn.Linear):
            found.append((name, module.in_features, module.out_features))
        elif _is_conv1d(module):
            in_features, out_features = module.weight.shape
            found.append((name, int(in_features), int(out_features)))
    return found


def _check_tensor_parallel(report: Report, body: Any, plan: Dict[str, str], text_config: Any, tp: int) -> None:
    from .layers import _STYLE_TO_LINEAR, plan_regexes

    regexes = plan_regexes(plan)
    uncovered, unknown, indivisible = [], [], []
    for name, in_features, out_features in _linears(body):
        style = next((s for regex, s in regexes if regex.match(name)), None)
        report.linears.append({"name": name, "in_features": in_features, "out_features": out_features,
                               "style": style})
        if style is None:
            uncovered.append(name)
        elif style not in _STYLE_TO_LINEAR:
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
    if not plan:
        report.add("tensor parallel", ERROR, f"{report.body_class} has no tp_plan, so it cannot be sharded over "
                   f"{tp} ranks. Fix: add `base_model_tp_plan` to its config (or `_tp_plan` to the model class), "
                   "mapping each linear's name pattern to 'colwise'/'rowwise', or run with --tp 1")
    elif unknown:
        report.add("tensor parallel", ERROR, f"tp_plan styles without a vLLM equivalent (known: "
                   f"{', '.join(sorted(_STYLE_TO_LINEAR))})", unknown)
    elif indivisible:
        report.add("tensor parallel", ERROR, f"sharded dimensions not divisible by TP={tp}", indivisible)
    elif uncovered:
        report.add("tensor parallel", WARN, f"tp_plan covers {covered}/{total} linears; the other {len(uncovered)} "
                   f"have no style and are replicated on every rank (correct, not sharded)", uncovered)
    else:
        report.add("tensor parallel", OK, f"tp_plan covers all {total} linears at TP={tp}")
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
    absent = [name for name in plan if _submodule(body, name) is None]
    num_layers = getattr(text_config, "num_hidden_layers", 0)
    if absent:
        report.add("pipeline parallel", ERROR, f"pp_plan names modules {report.body_class} does not have", absent)
    elif num_layers < pp:
        report.add("pipeline parallel", ERROR, f"{num_layers} layers cannot fill {pp} pipeline stages")
    elif num_layers % pp:
        report.add("pipeline parallel", WARN, f"{num_layers} layers are not divisible by PP={pp}: vLLM gives the "
                   "last stage the remainder (or set VLLM_PP_LAYER_PARTITION)")
    else:
        report.add("pipeline parallel", OK, f"pp_plan ({', '.join(plan)}); {num_layers // pp} layers per stage")


def _submodule(body: Any, name: str) -> Any:
    module = body
    for part in name.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


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


def _check_checkpoint(report: Report, path: Path, hf_model: Any, body: Any, prefix: str, config: Any,
                      quantized: bool) -> None:
    from . import compat
    from .base import Base
    from .weights import WeightsLoadingError, build_weights_mapper

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
    output_names = Base._output_embedding_qualnames(hf_model)
    mapper = build_weights_mapper(type(hf_model), prefix, output_names, compat.checkpoint_transforms(hf_model))
    # The backend's parameter names: the HF body under "model.", the causal wrapper's "lm_head.", the
    # sequence-classification head under "head.".
    params = {f"model.{n}": tuple(p.shape) for n, p in body.named_parameters(remove_duplicate=False)}
    if report.sequence_head:
        from .sequence_classification import add_head_prefixes, head_names

        names = head_names(hf_model, prefix)
        add_head_prefixes(mapper, names)
        for name in names:
            params.update({f"head.{name}.{n}": tuple(p.shape)
                           for n, p in getattr(hf_model, name).named_parameters()})
    elif output_names and report.kind == "decoder":
        head = hf_model.get_output_embeddings()
        params.update({f"lm_head.{n}": tuple(p.shape) for n, p in head.named_parameters()})
    encoder = report.kind == "encoder" and not report.sequence_head  # the embedding model
    if encoder:  # the pooling wrapper drops HF's own pooler (see pooling.py)
        params = {n: shape for n, shape in params.items() if not n.startswith("model.pooler.")}
    targets = {**{f"model.{n}": None for n, _ in body.named_buffers()}, **params}
    tied = report.kind == "decoder" and not report.sequence_head and compat.ties_word_embeddings(config)
    loaded, unmapped, mismatched = set(), [], []
    try:
        for key, shape in sorted(tensors.items()):
            target, _, unexpected = mapper.resolve(key, targets)
            if target is None:
                if unexpected:
                    unmapped.append(key)
                continue
            loaded.add(target)
            expected = params.get(target)
            if shape is not None and expected is not None and tuple(shape) != tuple(expected):
                mismatched.append(f"{key} {list(shape)} -> {target} {list(expected)}")
    except WeightsLoadingError as exc:
        report.add("checkpoint keys", ERROR, str(exc))
        return
    heads: List[str] = []
    if encoder:  # the pooling wrapper ignores task heads (MLM, classifier) and HF's pooler
        from .pooling import is_task_head_key

        children = {name for name, _ in body.named_children()}
        prefixes = (prefix, getattr(hf_model, "base_model_prefix", ""))
        heads = [k for k in unmapped if is_task_head_key(k, children, prefixes)]
        unmapped = [k for k in unmapped if k not in set(heads)]
    skip = {"lm_head.weight"} if tied else set()
    missing = sorted(n for n in params if n not in loaded and n not in skip)
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
        report.add("checkpoint keys", OK, f"all {len(tensors) - len(heads)} {fmt} tensors map to the backend's "
                   f"parameters ({len(loaded)} filled{', lm_head tied' if tied else ''})"
                   + (f"; {len(heads)} tensors of task heads or HF's pooler, which the pooling model does not use, "
                      "are skipped" if heads else ""))


# --- output ---------------------------------------------------------------------------------------------


def _preview(values: List[Any], limit: int = 8) -> str:
    shown = ", ".join(str(v) for v in values[:limit])
    return shown + (f", ... ({len(values) - limit} more)" if len(values) > limit else "")


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
