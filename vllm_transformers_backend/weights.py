"""Checkpoint names -> backend parameter names, and a strict loader.

vLLM 0.6.2 has no ``WeightsMapper``/``AutoWeightsLoader`` and never checks that a checkpoint was
fully used. :class:`WeightsMapper` renames with ordered regex rules and then tries prefix variants
against the parameters that exist, so that checkpoints saved with, without or with another base-model
prefix all load. :func:`load_weights` refuses a checkpoint with keys that map nowhere and a model with
parameters the checkpoint did not fill, listing them.

Decode step: not on it (runs once, when the engine loads the checkpoint).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import (Any, Callable, Dict, Iterable, List, NamedTuple, Optional, Pattern, Protocol, Sequence, Set,
                    Tuple)

import torch
from torch import nn

from ._logging import preview

#: Buffers HF computes at construction that old checkpoints still carry.
_COMPUTED_BUFFERS = (r"\.rotary_emb\.inv_freq$", r"(^|\.)rotary_emb\.", r"\.attn\.masked_bias$")


class WeightsLoadingError(ValueError):
    """The checkpoint and the model do not correspond."""


class StackedShard(NamedTuple):
    """A module fused into a vLLM layer: that layer's name, the shard id its tensors load as, and the
    checkpoint shapes its tensors must have (empty: the layer's loader checks them)."""

    fused: str
    shard_id: Any
    shapes: Dict[str, Tuple[int, ...]]


class Resolution(NamedTuple):
    """Where a checkpoint tensor goes: the model name (None: skipped or unmapped), the shard id when that
    is a fused layer's parameter, and whether the tensor is unexpected (maps nowhere, no rule skips it)."""

    target: Optional[str]
    shard: Optional[StackedShard]
    unexpected: bool


@dataclass
class WeightsMapper:
    """Ordered renaming rules, then prefix resolution against the model's own names.

    ``renames``: (regex, replacement) applied in order with ``re.sub`` (transformers v4
    ``_checkpoint_conversion_mapping``, v5 ``WeightRenaming``, legacy ``gamma``/``beta``).
    ``prefixes``: (checkpoint prefix, model prefix) pairs tried when the renamed key is not a
    parameter as is, e.g. ``("transformer.", "model.")`` for GPT-2 or ``("", "model.")`` for a base
    model saved without prefix.
    ``ignore``: regexes (searched) of checkpoint keys that are always skipped (computed buffers).
    ``ignore_unexpected``: regexes of keys skipped only when they map to nothing, the way transformers
    applies a model's ``_keys_to_ignore_on_load_unexpected`` (GPT-2's ``attn.bias`` would otherwise
    also swallow ``c_attn.bias``).
    """

    renames: List[Tuple[Pattern, str]] = field(default_factory=list)
    #: Renaming functions applied after ``renames`` (transformers 5 ``WeightRenaming.rename_source_key``).
    rename_fns: List[Callable[[str], str]] = field(default_factory=list)
    prefixes: List[Tuple[str, str]] = field(default_factory=list)
    ignore: List[Pattern] = field(default_factory=list)
    ignore_unexpected: List[Pattern] = field(default_factory=list)
    #: Predicates with the same role as ``ignore_unexpected`` (rules a regex says badly).
    ignore_unexpected_fns: List[Callable[[str], bool]] = field(default_factory=list)
    #: Module name of a fused sibling (``model.layers.0.self_attn.q_proj``) -> where its tensors load.
    stacked: Dict[str, StackedShard] = field(default_factory=dict)
    #: Checks run on a key that maps nowhere, before it is reported unexpected: each raises when the key
    #: needs a checkpoint conversion the backend does not apply (transformers 5 ``WeightConverter``).
    refusals: List[Callable[[str], None]] = field(default_factory=list)

    def copy(self) -> "WeightsMapper":
        """A mapper with the same rules whose lists can grow apart from this one's."""
        return WeightsMapper(list(self.renames), list(self.rename_fns), list(self.prefixes), list(self.ignore),
                             list(self.ignore_unexpected), list(self.ignore_unexpected_fns), dict(self.stacked),
                             list(self.refusals))

    def add_rename(self, pattern: str, replacement: str) -> None:
        self.renames.append((re.compile(pattern), replacement))

    def add_ignore(self, pattern: str) -> None:
        self.ignore.append(re.compile(pattern))

    def is_ignored_unexpected(self, name: str) -> bool:
        return any(p.search(name) for p in self.ignore_unexpected) or any(f(name) for f in self.ignore_unexpected_fns)

    def add_ignore_unexpected(self, pattern: str) -> None:
        self.ignore_unexpected.append(re.compile(pattern))

    def is_ignored(self, name: str) -> bool:
        return any(p.search(name) for p in self.ignore)

    def candidates(self, name: str) -> List[str]:
        for pattern, replacement in self.renames:
            name = pattern.sub(replacement, name)
        for rename in self.rename_fns:
            name = rename(name)
        found = [name]
        for ckpt_prefix, model_prefix in self.prefixes:
            if name.startswith(ckpt_prefix):
                found.append(model_prefix + name[len(ckpt_prefix):])
        return found

    def resolve(self, name: str, targets: Set[str] | Dict[str, object]) -> Resolution:
        """Where ``name`` loads (see :class:`Resolution`)."""
        if self.is_ignored(name):
            return Resolution(None, None, False)
        target, shard = self.locate(name, targets)
        unexpected = target is None and not self.is_ignored_unexpected(name)
        if unexpected:
            for refuse in self.refusals:
                refuse(self.candidates(name)[0])
        return Resolution(target, shard, unexpected)

    def map(self, name: str, targets: Set[str] | Dict[str, object]) -> Optional[str]:
        """The model name this checkpoint key loads into, or None if it maps nowhere."""
        return self.locate(name, targets)[0]

    def locate(self, name: str, targets: Set[str] | Dict[str, object]) -> Tuple[Optional[str], Optional[StackedShard]]:
        """The model name this checkpoint key loads into and, for a fused sibling's tensor, its shard."""
        for candidate in self.candidates(name):
            if candidate in targets:
                return candidate, None
            module, _, param = candidate.rpartition(".")
            shard = self.stacked.get(module)
            if shard is not None and f"{shard.fused}.{param}" in targets:
                return f"{shard.fused}.{param}", shard
        return None, None


def add_checkpoint_transforms(mapper: WeightsMapper, transforms: Sequence[object]) -> None:
    """transformers 5 transforms: renames are applied. A converter (tensors merged or split) is refused by name
    for a key that nothing else places: per-expert tensors packed by transformers' MoE converters are taken
    before the mapping by the backend's expert loader (:mod:`.moe_weights`) for the blocks it knows."""
    for transform in transforms:
        rename = getattr(transform, "rename_source_key", None)
        if rename is None:
            continue
        if type(transform).__name__ == "WeightRenaming":
            mapper.rename_fns.append(lambda key, rename=rename: rename(key)[0])
        else:
            def refuse(key: str, rename=rename, transform=transform) -> None:
                if rename(key)[1] is not None:
                    raise WeightsLoadingError(
                        f"checkpoint tensor {key!r} needs transformers' {type(transform).__name__} "
                        f"({transform!r}), which merges or splits tensors; the backend applies such conversions "
                        "only to the mixture-of-experts layouts it knows (gated experts, per-expert or packed "
                        "[gate; up]). Convert the checkpoint with transformers (save_pretrained) first."
                    )

            mapper.refusals.append(refuse)


def legacy_renames(mapper: WeightsMapper) -> None:
    """LayerNorm ``gamma``/``beta`` of old TF-ported checkpoints (transformers v4 renames them too)."""
    mapper.add_rename(r"\.gamma$", ".weight")
    mapper.add_rename(r"\.beta$", ".bias")


def computed_buffer_ignores(mapper: WeightsMapper) -> None:
    for pattern in _COMPUTED_BUFFERS:
        mapper.add_ignore(pattern)


def build_weights_mapper(
    hf_model_class: type,
    checkpoint_prefix: str,
    output_embedding_names: Sequence[str],
    checkpoint_transforms: Sequence[object] = (),
) -> WeightsMapper:
    """The mapper for a backend model built from ``hf_model_class`` (HF's class, e.g. ``LlamaForCausalLM``).

    ``checkpoint_prefix``: the body's attribute name in HF checkpoints (``model``, ``transformer``);
    ``output_embedding_names``: qualified names of HF's output embedding (``lm_head``, ``embed_out``),
    loaded into the backend's ``lm_head``; ``checkpoint_transforms``: transformers 5 transforms.
    Used by the backend at load time and by ``check`` without building the backend.
    """
    cls = hf_model_class
    mapper = WeightsMapper()
    for pattern, replacement in (getattr(cls, "_checkpoint_conversion_mapping", None) or {}).items():
        mapper.add_rename(pattern, replacement)
    add_checkpoint_transforms(mapper, checkpoint_transforms)
    legacy_renames(mapper)
    for name in output_embedding_names:
        mapper.prefixes.append((f"{name}.", "lm_head."))
    prefixes = [p for p in dict.fromkeys((checkpoint_prefix, getattr(cls, "base_model_prefix", ""))) if p]
    for prefix in prefixes:
        mapper.prefixes += [(f"{prefix}.lm_head.", "lm_head."), (f"{prefix}.", "model."), (f"{prefix}.", "")]
    mapper.prefixes.append(("", "model."))
    for pattern in getattr(cls, "_keys_to_ignore_on_load_unexpected", None) or ():
        mapper.add_ignore_unexpected(pattern)
    computed_buffer_ignores(mapper)
    return mapper


def copy_checked(param: torch.Tensor, loaded: torch.Tensor) -> None:
    """The loader of a parameter without a ``weight_loader`` of its own: a copy after a shape check."""
    if param.shape != loaded.shape:
        raise WeightsLoadingError(f"shape mismatch: parameter {tuple(param.shape)} vs checkpoint {tuple(loaded.shape)}")
    param.data.copy_(loaded)


class TensorConsumer(Protocol):
    """Takes checkpoint tensors the name mapping cannot place alone (a mixture-of-experts block's experts in
    another layout than the model's, :class:`.moe_weights.ExpertTensors`), and answers for its parameters.
    ``take`` gets a tensor when loading, a shape or None in a dry run (then it only checks)."""

    def take(self, key: str, candidates: Sequence[str], tensor: Any) -> bool: ...

    def owned(self) -> Set[str]: ...

    def unfilled(self) -> List[str]: ...


@dataclass
class LoadAccount:
    """What a checkpoint does to a module: the names it fills and what does not fit."""

    loaded: Set[str] = field(default_factory=set)
    #: checkpoint keys that map to no parameter and that no rule excuses
    unmapped: List[str] = field(default_factory=list)
    #: checkpoint keys that map nowhere but a rule excuses (task heads, a class's ignore list)
    excused: List[str] = field(default_factory=list)
    #: parameters no checkpoint tensor filled (the skipped ones aside)
    missing: List[str] = field(default_factory=list)
    #: (checkpoint key, its shape, parameter, the parameter's shape): dry runs only (loading raises)
    mismatched: List[Tuple[str, Tuple[int, ...], str, Tuple[int, ...]]] = field(default_factory=list)


def _account(module: nn.Module, weights: Iterable[Tuple[str, Any]], mapper: WeightsMapper, skip: Sequence[str],
             consumers: Sequence[TensorConsumer], dry_run: bool) -> LoadAccount:
    """The loader's bookkeeping, shared by loading (``weights`` are tensors, copied in) and the dry run
    (``weights`` are shapes or None, as a checkpoint header lists them; nothing is copied). ``consumers`` see
    each key (with the mapper's candidate names) first; the parameters they own they check themselves."""
    params = dict(module.named_parameters(remove_duplicate=False))
    buffers = dict(module.named_buffers())
    targets = {**buffers, **params}
    skip_set = set(skip)
    account = LoadAccount()
    # Fused parameters are complete when every shard has loaded: (fused parameter) -> shard ids loaded.
    shards_loaded: Dict[str, Set[Any]] = {}
    for name, tensor in weights:
        if consumers and not mapper.is_ignored(name):
            candidates = mapper.candidates(name)
            if any(consumer.take(name, candidates, tensor) for consumer in consumers):
                continue
        target, shard, unexpected = mapper.resolve(name, targets)
        if target is None:
            if unexpected:
                account.unmapped.append(name)
            elif not mapper.is_ignored(name):
                account.excused.append(name)
            continue
        if target in skip_set:
            continue
        shape = None if tensor is None else tuple(tensor if dry_run else tensor.shape)
        if target in params:
            param = params[target]
            if dry_run:
                expected = tuple(param.shape) if shard is None else shard.shapes.get(target.rpartition(".")[2])
                if shape is not None and expected is not None and shape != tuple(expected):
                    account.mismatched.append((name, shape, target, tuple(expected)))
            else:
                loader = getattr(param, "weight_loader", copy_checked)
                try:
                    if shard is None:
                        loader(param, tensor)
                    else:
                        _check_shard_shape(shard, target, tensor)
                        loader(param, tensor, shard.shard_id)
                except (AssertionError, RuntimeError, WeightsLoadingError) as exc:
                    raise WeightsLoadingError(
                        f"checkpoint tensor {name!r} {tuple(tensor.shape)} does not fit parameter {target!r} "
                        f"{tuple(param.shape)}{_shard_note(shard)}: {exc}"
                    ) from exc
            if shard is not None:
                shards_loaded.setdefault(target, set()).add(shard.shard_id)
        else:
            buffer = buffers[target]
            if shape is not None and tuple(buffer.shape) != shape:
                continue  # a buffer HF recomputes (causal masks of old GPT-2 checkpoints and the like)
            if not dry_run:
                buffer.copy_(tensor)
        account.loaded.add(target)
    fused = {shard.fused for shard in mapper.stacked.values()}
    owned = set().union(*(consumer.owned() for consumer in consumers)) if consumers else set()
    account.missing = sorted(n for n in params if n not in account.loaded and n not in skip_set
                             and n.rpartition(".")[0] not in fused and n not in owned)
    account.missing += _missing_shards(mapper, params, shards_loaded, owned)
    account.missing += [line for consumer in consumers for line in consumer.unfilled()]
    return account


def load_weights(
    module: nn.Module,
    weights: Iterable[Tuple[str, torch.Tensor]],
    mapper: WeightsMapper,
    *,
    skip: Sequence[str] = (),
    consumers: Sequence[TensorConsumer] = (),
) -> Set[str]:
    """Loads ``weights`` into ``module``'s parameters (and persistent buffers) through ``mapper``.

    ``skip``: model names whose checkpoint entries are dropped (a tied ``lm_head.weight``) and that may
    stay unloaded. ``consumers``: see :func:`_account`. Returns the loaded names; raises when a key maps
    nowhere or a parameter stays empty.
    """
    account = _account(module, weights, mapper, skip, consumers, dry_run=False)
    if account.unmapped:
        raise WeightsLoadingError(
            f"{len(account.unmapped)} checkpoint tensor(s) map to no parameter of {type(module).__name__}: "
            f"{preview(account.unmapped, 12)}. The checkpoint does not match the model's architecture, or it needs "
            "a renaming rule; parameters look like: "
            + preview(sorted(dict(module.named_parameters(remove_duplicate=False))), 12)
        )
    if account.missing:
        raise WeightsLoadingError(
            f"{len(account.missing)} parameter(s) of {type(module).__name__} got no weights from the checkpoint: "
            f"{preview(account.missing, 12)}. The checkpoint is incomplete or saved under other names."
        )
    return account.loaded


def _check_shard_shape(shard: StackedShard, target: str, tensor: torch.Tensor) -> None:
    # vLLM's merged loaders narrow the tensor to the shard without checking its full size: a checkpoint
    # tensor of the wrong shape must still be refused, as the unfused layer's loader does.
    expected = shard.shapes.get(target.rpartition(".")[2])
    if expected is not None and tuple(tensor.shape) != tuple(expected):
        raise WeightsLoadingError(f"shape mismatch: checkpoint {tuple(tensor.shape)}, expected {expected}")


def _shard_note(shard: Optional[StackedShard]) -> str:
    return "" if shard is None else f" (shard {shard.shard_id!r} of the fused {shard.fused})"


def _missing_shards(mapper: WeightsMapper, params: Dict[str, object], shards_loaded: Dict[str, Set[Any]],
                    owned: Set[str] = frozenset()) -> List[str]:
    """The fused siblings' parameters (by their own names) whose shard the checkpoint did not fill (those a
    consumer owns, it checks itself)."""
    by_module: Dict[str, List[str]] = {}
    for name in params:
        module, _, param = name.rpartition(".")
        by_module.setdefault(module, []).append(param)
    missing = []
    for module, shard in sorted(mapper.stacked.items()):
        for param in by_module.get(shard.fused, ()):
            if f"{shard.fused}.{param}" in owned:
                continue
            if shard.shard_id not in shards_loaded.get(f"{shard.fused}.{param}", ()):
                missing.append(f"{module}.{param}")
    return missing


def dry_run(module: nn.Module, shapes: Iterable[Tuple[str, Optional[Tuple[int, ...]]]], mapper: WeightsMapper, *,
            skip: Sequence[str] = (), consumers: Sequence[TensorConsumer] = ()) -> LoadAccount:
    """:func:`load_weights`' bookkeeping over checkpoint names and shapes alone (``check``: header-only
    tensors, no data), against a module whose parameters have the checkpoint's shapes. Raises only what the
    mapper raises (a transformers 5 conversion the backend cannot apply) and what a consumer raises (an expert
    tensor of the wrong shape, or one that comes twice)."""
    return _account(module, shapes, mapper, skip, consumers, dry_run=True)
