"""A model's tensor-parallel plan (``tp_plan``): where it is declared, which style each module gets.

transformers declares the plan in three places, all honoured here:

* ``config.base_model_tp_plan``: patterns relative to the base model (``layers.*.self_attn.q_proj``);
* a model class's own ``_tp_plan`` (transformers' causal heads: ``{"lm_head": ...}``; custom models such
  as Forgather's declare the whole plan there), relative to that model;
* the instance ``_tp_plan`` transformers' ``post_init`` assembles on the top model (the base plan under
  the body's attribute name, ``model.layers.*...``).

Patterns of the top model are re-rooted on the body (``model.layers.*.x`` -> ``layers.*.x``); those
outside the body (``lm_head``) concern the head, which the backend always shards by vocabulary.

Styles on modules that are not ``nn.Linear``/``Conv1D`` (norms, expert tensors, ``gather``/``local``
containers, embeddings) are not sharded: those modules stay whole on every rank and compute their full
result, which is what transformers' sharded computation sums back to. Only a linear-sharding style on a
module that holds parameters the backend cannot shard, and ``all_reduce`` (a module whose own arithmetic
ends in a partial sum), are refused.

Decode step: not on it (decides at build time which vLLM linear each projection becomes).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

from torch import nn

from .layers import KNOWN_LINEAR_STYLES, UnsupportedTPStyleError, plan_regexes

#: Styles that shard a linear's weight; on a module the backend does not replace they cannot be honoured.
LINEAR_SHARDING_STYLES = frozenset({
    "colwise", "local_colwise", "colwise_rep", "colwise_gather_output", "rowwise", "local_rowwise",
    "rowwise_rep", "rowwise_split_input",
})
#: Styles of non-linear modules and tensors whose module, kept whole on every rank, gives the same result.
REPLICABLE_STYLES = frozenset({
    "replicate", "replicated_with_grad_allreduce", "sequence_parallel", "local", "gather",
    "embedding_rowwise", "embedding_colwise", "mla_kv_a_proj",
    # mixture-of-experts tensors (expert weights, routers): kept whole, every rank runs every expert
    "grouped_gemm", "ep_router", "megamoe_router", "moe_tp_experts", "megamoe_experts", "moe_identity_expert",
    "packed_colwise", "packed_rowwise", "local_packed_rowwise",
})


def class_plans(obj: Any, attr: str) -> List[Dict[str, Any]]:
    """The class-level and instance-level plan ``attr`` (``_tp_plan``/``_pp_plan``) of ``obj``, if set."""
    found = []
    for plan in (getattr(type(obj), attr, None), vars(obj).get(attr) if hasattr(obj, "__dict__") else None):
        if isinstance(plan, dict) and plan:
            found.append(plan)
    return found


#: Plans a later transformers release declares for a model whose installed release declares none, written for
#: the installed release's module layout. OLMoE: transformers 5.0 gathers q/k/v on every rank (its q/k norms
#: span all heads) and splits o_proj's full input; 4.x has per-expert ``OlmoeMLP`` linears, split as 4.x's
#: Qwen3-MoE plan splits its own. Used only where neither the config nor its class has a plan.
LATER_RELEASE_TP_PLANS: Dict[str, Dict[str, str]] = {
    "olmoe": {
        "layers.*.self_attn.q_proj": "colwise_gather_output",
        "layers.*.self_attn.k_proj": "colwise_gather_output",
        "layers.*.self_attn.v_proj": "colwise_gather_output",
        "layers.*.self_attn.o_proj": "rowwise_split_input",
        "layers.*.mlp.experts.*.gate_proj": "colwise",
        "layers.*.mlp.experts.*.up_proj": "colwise",
        "layers.*.mlp.experts.*.down_proj": "rowwise",
    },
}


def config_plan(text_config: Any, attr: str) -> Dict[str, Any]:
    """``text_config.<attr>`` (``base_model_tp_plan``/``base_model_pp_plan``), else the class default of
    transformers' own config class for the same ``model_type`` (vLLM 0.6.2 loads some configs, Granite's
    among them, with classes of its own, which carry no plan), else, for the tp_plan,
    :data:`LATER_RELEASE_TP_PLANS`."""
    plan = _declared_plan(text_config, attr)
    if not plan and attr == "base_model_tp_plan":
        plan = LATER_RELEASE_TP_PLANS.get(getattr(text_config, "model_type", ""))
    return dict(plan or {})


def _declared_plan(text_config: Any, attr: str) -> Any:
    plan = getattr(text_config, attr, None)
    if plan:
        return plan
    try:
        from transformers import CONFIG_MAPPING

        return getattr(CONFIG_MAPPING[getattr(text_config, "model_type", "")], attr, None)
    except (KeyError, ImportError):
        return None


def uses_later_release_plan(text_config: Any) -> bool:
    """Whether :func:`config_plan` gives this model the backend's copy of a later release's tp_plan."""
    return (not _declared_plan(text_config, "base_model_tp_plan")
            and getattr(text_config, "model_type", "") in LATER_RELEASE_TP_PLANS)


def collect_plan(hf_model: nn.Module, body: nn.Module, body_name: str, text_config: Any, kind: str,
                 *, later_wins: bool = True) -> Dict[str, Any]:
    """The ``kind`` plan ("tp" or "pp") for ``body`` (the base model, attribute ``body_name`` of ``hf_model``),
    keys relative to it: the config's ``base_model_<kind>_plan``, then the body's and the top model's
    class plans (entries of the top model under ``body_name`` re-rooted on the body). ``later_wins``: a
    later source overrides an earlier one (tp styles); otherwise the first keeps its place (pp order)."""
    plan: Dict[str, Any] = config_plan(text_config, f"base_model_{kind}_plan")
    attr = f"_{kind}_plan"

    def put(key: str, value: Any) -> None:
        if later_wins or key not in plan:
            plan[key] = value

    if body is not hf_model:
        for body_plan in class_plans(body, attr):
            for key, value in body_plan.items():
                put(key, value)
    prefix = f"{body_name}." if body_name and body is not hf_model else ""
    for top_plan in class_plans(hf_model, attr):
        for key, value in top_plan.items():
            if prefix and key.startswith(prefix):
                put(key[len(prefix):], value)
            elif not prefix:
                put(key, value)
    return plan


def collect_tp_plan(hf_model: nn.Module, body: nn.Module, body_name: str, text_config: Any) -> Dict[str, str]:
    """The tp_plan for ``body``, keys relative to it (later sources override earlier ones)."""
    return collect_plan(hf_model, body, body_name, text_config, "tp")


class TPPlan:
    """Style lookup by qualified name (relative to the body), as transformers resolves it: a tensor's own
    entry (``x.weight``) before its module's (``x``)."""

    def __init__(self, plan: Dict[str, str]) -> None:
        self.plan = dict(plan)
        self._regexes = plan_regexes(self.plan)

    def __bool__(self) -> bool:
        return bool(self.plan)

    def _match(self, name: str) -> Optional[str]:
        for regex, style in self._regexes:
            if regex.match(name):
                return style
        return None

    def style_of(self, qualname: str) -> Optional[str]:
        """The style of the linear at ``qualname`` (None: replicated)."""
        return self._match(f"{qualname}.weight") or self._match(qualname)

    def check_unreplaced(self, body: nn.Module, is_linear, input_embedding: Optional[nn.Module]) -> List[str]:
        """Refuses styles that would be silently wrong on modules the backend keeps whole; returns the
        names of modules whose (replicable) styles are not sharded, for the log."""
        kept: List[str] = []
        problems: List[str] = []
        for qualname, module in body.named_modules():
            if not qualname or is_linear(module):
                continue
            own = [f"{qualname}.{name}" for name, p in module._parameters.items() if p is not None]
            for name, style in [(qualname, self._match(qualname))] + [(n, self._match(n)) for n in own]:
                if style is None:
                    continue
                if style == "all_reduce":
                    problems.append(f"{name}: 'all_reduce' (its output is a partial sum over ranks; not supported)")
                elif module is input_embedding or isinstance(module, nn.Embedding):
                    kept.append(name)  # the input embedding is vocab-parallel whatever the style
                elif style in LINEAR_SHARDING_STYLES and own:
                    problems.append(f"{name}: {style!r} on {type(module).__name__}, which is not an nn.Linear "
                                    "(the backend shards nn.Linear and GPT-2 Conv1D only)")
                elif style in REPLICABLE_STYLES or (style in LINEAR_SHARDING_STYLES and not own):
                    if own:
                        kept.append(name)
                else:
                    problems.append(f"{name}: unknown tp_plan style {style!r}")
        if problems:
            raise UnsupportedTPStyleError(
                "the model's tp_plan cannot be honoured by the Transformers backend:\n  " + "\n  ".join(problems)
                + f"\nKnown styles for nn.Linear: {', '.join(sorted(KNOWN_LINEAR_STYLES))}. Run with "
                "tensor_parallel_size=1, or adapt the plan.")
        return kept
