"""Expert tensors of mixture-of-experts blocks, from either checkpoint layout into any model layout.

Checkpoints hold a block's experts in one of two layouts:

* **per expert**: ``<experts>.<e>.gate_proj.weight`` ``[I, H]``, ``up_proj`` ``[I, H]``, ``down_proj`` ``[H, I]``
  (Mixtral: ``w1``/``w3``/``w2``). transformers 4.x writes it, transformers 5's ``save_pretrained`` writes it
  back by default, vLLM's native models read it;
* **packed**: ``<experts>.gate_up_proj`` ``[E, 2I, H]`` (each expert's gate rows, then its up rows) and
  ``<experts>.down_proj`` ``[E, H, I]``: transformers 5's own parameters
  (``save_pretrained(save_original_format=False)``).

The backend holds them as per-expert linears (transformers 4.x code on the CPU engine), as packed tensors
(transformers 5 code) or as one vLLM ``FusedMoE`` (``w13_weight`` ``[E, 2I/tp, H]``, ``w2_weight``
``[E, H, I/tp]``: the packed layout cut over the intermediate size). Every checkpoint tensor of a known block
is cut into per-expert pieces (gate, up or down of expert ``e``, full size) and each piece goes where the model
keeps it, sharded for this rank. This is transformers 5's ``WeightConverter`` merge (``MergeModulelist`` +
``Concatenate``) in both directions, without collecting a layer's tensors first. Coverage is kept per piece:
a piece missing from the checkpoint, loaded twice (a checkpoint holding both layouts) or of the wrong shape
is an error naming the key and the expert.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Set, Tuple, Union

import torch

from .weights import WeightsLoadingError, copy_checked

#: The three pieces of a gated expert: ``down(silu(gate(x)) * up(x))``.
PIECES: Tuple[str, str, str] = ("gate", "up", "down")
#: Per-expert checkpoint names -> piece (``gate_proj``/``up_proj``/``down_proj``; Mixtral's ``w1``/``w3``/``w2``).
PER_EXPERT_NAMES: Dict[str, str] = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down",
                                    "w1": "gate", "w3": "up", "w2": "down"}
#: Child-name triples (gate, up, down) of per-expert modules, in the order transformers' models use them.
PER_EXPERT_TRIPLES: Tuple[Tuple[str, str, str], ...] = (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2"))
#: Packed checkpoint names -> what they hold.
PACKED_NAMES: Dict[str, str] = {"gate_up_proj": "gate_up", "down_proj": "down"}
#: Names a block's attribute has had across transformers releases: Mixtral's ``block_sparse_moe`` became
#: ``mlp`` in 5.x (a ``WeightRenaming`` there); a packed checkpoint (5.x names) then still finds a 4.x block.
BLOCK_ALIASES: Dict[str, Tuple[str, ...]] = {"block_sparse_moe": ("mlp",), "mlp": ("block_sparse_moe",)}

_PER_EXPERT_KEY = re.compile(r"^(?P<prefix>.+)\.(?P<expert>\d+)\.(?P<name>" + "|".join(PER_EXPERT_NAMES)
                             + r")\.weight$")
_PACKED_KEY = re.compile(r"^(?P<prefix>.+)\.(?P<name>" + "|".join(PACKED_NAMES) + r")(?:\.weight)?$")

Shape = Tuple[int, ...]


@dataclass(frozen=True)
class ExpertsShape:
    """A block's experts at full size (before any tensor-parallel split)."""

    num_experts: int
    hidden_size: int
    intermediate_size: int

    def piece_shape(self, piece: str) -> Shape:
        i, h = self.intermediate_size, self.hidden_size
        return (h, i) if piece == "down" else (i, h)

    def packed_shape(self, packed: str) -> Shape:
        e, i, h = self.num_experts, self.intermediate_size, self.hidden_size
        return (e, 2 * i, h) if packed == "gate_up" else (e, h, i)


# --- where pieces go --------------------------------------------------------------------------------


class PackedTarget:
    """Packed tensors ``gate_up [E, 2 * I_local, H]`` and ``down [E, H, I_local]`` holding this rank's slice of the
    intermediate size (transformers 5's packed parameters, or a vLLM ``FusedMoE``'s ``w13``/``w2``)."""

    def __init__(self, gate_up: torch.Tensor, down: torch.Tensor, rank: int) -> None:
        self.gate_up, self.down, self.rank = gate_up, down, rank
        self.local = down.shape[-1]

    def put(self, expert: int, piece: str, tensor: torch.Tensor) -> None:
        local, start = self.local, self.rank * self.local
        if piece == "down":
            self.down.data[expert].copy_(tensor.narrow(1, start, local))
        else:
            offset = 0 if piece == "gate" else local
            self.gate_up.data[expert, offset:offset + local].copy_(tensor.narrow(0, start, local))


class LinearsTarget:
    """Per-expert linears ``<prefix>.<e>.<name>.weight``, found as the weights mapper finds any checkpoint name
    (a fused gate/up pair loads as a shard of its ``gate_up_proj``); vLLM's loaders shard by their style."""

    def __init__(self, params: Dict[str, torch.nn.Parameter], prefix: str, names: Tuple[str, str, str],
                 locate: Callable[[str, Dict[str, torch.nn.Parameter]], Tuple[Optional[str], Any]]) -> None:
        self.params, self.prefix, self.locate = params, prefix, locate
        self.names = dict(zip(PIECES, names))

    def put(self, expert: int, piece: str, tensor: torch.Tensor) -> None:
        name = f"{self.prefix}.{expert}.{self.names[piece]}.weight"
        target, shard = self.locate(name, self.params)
        if target is None:
            raise WeightsLoadingError(f"{name}: no parameter of the model holds it")
        param = self.params[target]
        loader: Callable = getattr(param, "weight_loader", None) or copy_checked
        if shard is None:
            loader(param, tensor)
        else:
            loader(param, tensor, shard.shard_id)


Target = Union[PackedTarget, LinearsTarget]


# --- one block's experts ----------------------------------------------------------------------------


@dataclass
class ExpertSlots:
    """The experts of one block: the model name of its experts module, the names a checkpoint may use for it,
    its full shape, where pieces go (None: only check, as ``check`` does from safetensors headers)."""

    prefix: str
    shape: ExpertsShape
    target: Optional[Target] = None
    aliases: Tuple[str, ...] = ()
    loaded: Dict[Tuple[int, str], str] = field(default_factory=dict)  # (expert, piece) -> checkpoint key
    layouts: Set[str] = field(default_factory=set)  # "per-expert" / "packed": what the checkpoint had

    def take_piece(self, key: str, expert: int, piece: str, tensor: Optional[torch.Tensor],
                   shape: Optional[Shape]) -> None:
        if not 0 <= expert < self.shape.num_experts:
            raise WeightsLoadingError(f"checkpoint tensor {key!r} is for expert {expert}, but {self.prefix} has "
                                      f"{self.shape.num_experts} experts")
        expected = self.shape.piece_shape(piece)
        if shape is not None and tuple(shape) != expected:
            raise WeightsLoadingError(f"checkpoint tensor {key!r} {tuple(shape)} does not fit expert {expert}'s "
                                      f"{piece} projection of {self.prefix}: expected {expected}")
        self._mark(key, expert, piece)
        if self.target is not None and tensor is not None:
            self.target.put(expert, piece, tensor)

    def take_packed(self, key: str, packed: str, tensor: Optional[torch.Tensor], shape: Optional[Shape]) -> None:
        expected = self.shape.packed_shape(packed)
        if shape is not None and tuple(shape) != expected:
            raise WeightsLoadingError(f"checkpoint tensor {key!r} {tuple(shape)} does not fit the packed {packed} "
                                      f"experts of {self.prefix}: expected {expected}")
        size = self.shape.intermediate_size
        for expert in range(self.shape.num_experts):
            pieces = (("gate", 0), ("up", size)) if packed == "gate_up" else (("down", None),)
            for piece, offset in pieces:
                self._mark(key, expert, piece)
                if self.target is not None and tensor is not None:
                    part = tensor[expert] if offset is None else tensor[expert].narrow(0, offset, size)
                    self.target.put(expert, piece, part)

    def _mark(self, key: str, expert: int, piece: str) -> None:
        earlier = self.loaded.get((expert, piece))
        if earlier is not None:
            raise WeightsLoadingError(f"expert {expert}'s {piece} projection of {self.prefix} comes twice from the "
                                      f"checkpoint ({earlier!r} and {key!r}): it holds both the per-expert and the "
                                      "packed layout, or duplicate keys")
        self.loaded[(expert, piece)] = key

    def unfilled(self) -> List[str]:
        missing: Dict[int, List[str]] = {}
        for expert in range(self.shape.num_experts):
            for piece in PIECES:
                if (expert, piece) not in self.loaded:
                    missing.setdefault(expert, []).append(piece)
        return [f"{self.prefix}: expert {e} {'/'.join(p)}" for e, p in missing.items()]


class ExpertTensors:
    """The checkpoint consumer for every known MoE block (see :func:`weights.load_weights`): takes a block's expert
    tensors in either layout, owns the expert parameters for the loader's completeness check, and reports the
    pieces no tensor filled."""

    def __init__(self, slots: Iterable[ExpertSlots], owned: Iterable[str] = (), collect_errors: bool = False) -> None:
        self.slots: Dict[str, ExpertSlots] = {}
        #: ``collect_errors`` (``check``'s dry run): a tensor that does not fit is listed here, not raised
        self.errors: Optional[List[str]] = [] if collect_errors else None
        for slot in slots:
            for prefix in (slot.prefix,) + slot.aliases:
                self.slots[prefix] = slot
        self._owned = set(owned)

    def __bool__(self) -> bool:
        return bool(self.slots)

    def match(self, candidates: Sequence[str]) -> Optional[Tuple[ExpertSlots, Optional[int], str]]:
        """``(slots, expert or None for packed, piece or packed name)`` of the first candidate name that is an
        expert tensor of a known block."""
        for name in candidates:
            found = _PER_EXPERT_KEY.match(name)
            if found and found["prefix"] in self.slots:
                return self.slots[found["prefix"]], int(found["expert"]), PER_EXPERT_NAMES[found["name"]]
            found = _PACKED_KEY.match(name)
            if found and found["prefix"] in self.slots:
                return self.slots[found["prefix"]], None, PACKED_NAMES[found["name"]]
        return None

    def take(self, key: str, candidates: Sequence[str], tensor: Union[torch.Tensor, Shape, None]) -> bool:
        """Loads (or, given a shape or None, only checks) ``key`` if it is an expert tensor; False otherwise."""
        matched = self.match(candidates)
        if matched is None:
            return False
        slots, expert, part = matched
        data = tensor if isinstance(tensor, torch.Tensor) else None
        shape = tuple(tensor.shape) if data is not None else (tuple(tensor) if tensor is not None else None)
        try:
            if expert is None:
                slots.layouts.add("packed")
                slots.take_packed(key, part, data, shape)
            else:
                slots.layouts.add("per-expert")
                slots.take_piece(key, expert, part, data, shape)
        except WeightsLoadingError as exc:
            if self.errors is None:
                raise
            self.errors.append(str(exc))
        return True

    def owned(self) -> Set[str]:
        return set(self._owned)

    def unfilled(self) -> List[str]:
        seen, out = set(), []
        for slot in self.slots.values():
            if id(slot) not in seen:
                seen.add(id(slot))
                out.extend(slot.unfilled())
        return out

    def layouts(self) -> Set[str]:
        return {layout for slot in self.slots.values() for layout in slot.layouts}


def block_aliases(experts_prefix: str) -> Tuple[str, ...]:
    """Other names a checkpoint may give ``experts_prefix`` (``...layers.0.block_sparse_moe.experts`` <->
    ``...layers.0.mlp.experts``)."""
    parts = experts_prefix.split(".")
    if len(parts) < 2:
        return ()
    return tuple(".".join(parts[:-2] + [alias, parts[-1]]) for alias in BLOCK_ALIASES.get(parts[-2], ()))
