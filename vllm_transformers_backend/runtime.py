"""Run-time replacements outside vLLM's import-time patches: what they are, who uses them, for ``doctor``; and
the patches' state as the backend reads it.

The patches (``patches/``) change vLLM once per process, at import. The backend changes a few more
things while models load, and every one of them is listed somewhere ``doctor`` reads:

* per model: the backend builds the model with vLLM modules (linears, embedding, attention instances;
  :func:`model_modules`) and the speed passes (:mod:`.passes`) swap more of its own modules and instance
  ``forward``s; nothing outside that model changes. Each backend model keeps the passes' reports
  (``model.speed_passes``, :func:`model_replacements`);
* per process: bindings in modules the whole process shares, registered here with the models that use
  them (:func:`bind`). transformers' ``ALL_ATTENTION_FUNCTIONS["vllm"]`` (added once, kept) and a modeling
  module's ``apply_rotary_pos_emb`` (the rotary pass): that function acts only inside the forward of a
  model that installed it (it checks the step's attention context) and is put back when the last such
  model is gone.

The patches depend on the backend, never the other way round. They record their state here each time they
are applied or checked (:func:`record_patches`; the model_loader patch checks them right before a backend
model is built), and backend code that needs an optional patch (LoRA's layer patch, the runners that carry
token types) reads it here (:func:`patch_applied`).

Decode step: not on it; the rotary binding it records is called inside each attention layer
(:mod:`.rotary`).
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple


@dataclass
class Binding:
    """``module.attr`` rebound (or a table entry added) by the backend: what it was, what it is, and the
    models that use it."""

    target: str
    by: str
    replacement: Any
    module: Any = None
    attr: str = ""
    original: Any = None
    #: id(model) -> its description, for the models that use the binding (None: kept for the process)
    users: Optional[Dict[int, str]] = field(default_factory=dict)


_BINDINGS: Dict[Tuple[int, str], Binding] = {}


def bind(module: ModuleType, attr: str, make: Callable[[Any], Any], *, by: str, user: Any = None) -> Binding:
    """Rebinds ``module.attr`` to ``make(original)`` unless already done, and records ``user`` (a model) as
    using it; without a user the binding is kept for the process."""
    key = (id(module), attr)
    current = getattr(module, attr)
    binding = _BINDINGS.get(key)
    if binding is None or current is not binding.replacement:  # new, or put back by someone else since
        binding = Binding(f"{module.__name__}.{attr}", by, make(current), module, attr, current,
                          {} if user is not None else None)
        setattr(module, attr, binding.replacement)
        _BINDINGS[key] = binding
    if user is not None and binding.users is not None and id(user) not in binding.users:
        binding.users[id(user)] = f"{type(user).__name__} at {id(user):#x}"
        weakref.finalize(user, _release, key, binding, id(user))
    elif user is None:
        binding.users = None
    return binding


def add(table: Any, name: str, value: Any, *, by: str, where: str) -> None:
    """Records ``value`` the backend added under ``name`` to a process-wide table (kept for the process);
    ``where`` names the table."""
    _BINDINGS.setdefault((id(table), name), Binding(f"{where}[{name!r}]", by, value, users=None))


def _release(key: Tuple[int, str], binding: Binding, user_id: int) -> None:
    if binding.users is None or binding.module is None:
        return
    binding.users.pop(user_id, None)
    if binding.users or _BINDINGS.get(key) is not binding:
        return
    del _BINDINGS[key]
    if getattr(binding.module, binding.attr, None) is binding.replacement:  # nobody rebound it since
        setattr(binding.module, binding.attr, binding.original)


def bound_by(module: ModuleType, attr: str, user: Any) -> Optional[str]:
    """The pass whose binding ``module.attr`` is, when it is in place for ``user`` (a model among its users, or
    a binding kept for the process); None otherwise (never rebound, put back, or another model's)."""
    binding = _BINDINGS.get((id(module), attr))
    if binding is None or getattr(module, attr, None) is not binding.replacement:
        return None
    return binding.by if binding.users is None or id(user) in binding.users else None


def original(module: ModuleType, attr: str) -> Any:
    """``module.attr`` as it was before the backend rebound it (as it is, if it did not)."""
    binding = _BINDINGS.get((id(module), attr))
    current = getattr(module, attr, None)
    return binding.original if binding is not None and current is binding.replacement else current


def process_replacements() -> List[Dict[str, Any]]:
    """Every process-wide binding now in place: target, by which pass, used by which models."""
    return [{"target": b.target, "by": b.by,
             "used_by": "the whole process (kept)" if b.users is None else ", ".join(b.users.values())}
            for b in _BINDINGS.values()]


def model_replacements(model: Any) -> List[Dict[str, Any]]:
    """Every replacement a backend model's speed passes made (one entry per pass, switched-off ones too)."""
    return [{"pass": r.name, "status": r.status, "reason": r.reason, "sites": r.sites, "replaced": r.replaced,
             "replacements": [vars(x) for x in r.replacements], "kept": dict(r.kept)}
            for r in getattr(model, "speed_passes", ())]


def model_modules(model: Any) -> Dict[str, int]:
    """The vLLM modules a backend model was built with (class -> how many): the linears by tp_plan style,
    embedding, norms, fused slices, head, and each layer's attention instance with its vLLM backend."""
    from .attention import vllm_attention_of

    counts: Dict[str, int] = {}
    modules = [m for m in model.modules() if m is not model
               and type(m).__module__.startswith(("vllm.", "vllm_transformers_backend."))]
    for attn in getattr(model, "attention_instances", {}).values():
        impl = getattr(vllm_attention_of(attn), "impl", None)
        modules.append(f"{type(attn).__name__}({type(impl).__name__})" if impl is not None else attn)
    for module in modules:
        name = module if isinstance(module, str) else type(module).__name__
        counts[name] = counts.get(name, 0) + 1
    return counts


#: patch name -> (applied, why not), as the patches last reported it.
_PATCHES: Dict[str, Tuple[bool, Optional[str]]] = {}


def record_patches(statuses: Iterable[Any]) -> None:
    """Called by the patches with their ``PatchStatus`` list."""
    for status in statuses:
        _PATCHES[status.name] = (bool(status.applied), status.error)


def patch_applied(name: str) -> Tuple[bool, Optional[str]]:
    """Whether the patch ``name`` is in place (as last reported), and why not."""
    return _PATCHES.get(name, (False, "the patches have not run in this process"))
