"""Pipeline parallelism by ``pp_plan``: which of the body's modules this rank keeps, and the hand-over.

A transformers ``pp_plan`` (``config.base_model_pp_plan`` or a model's ``_pp_plan``) lists the body's
top-level modules in forward order, e.g. ``embed_tokens``, ``layers`` (the one ``ModuleList`` of decoder
layers) and ``norm``. Rank ``r`` of ``p`` keeps the layers ``get_pp_indices`` gives it (vLLM's own split,
``VLLM_PP_LAYER_PARTITION`` included), the modules before the layers on the first rank (the input
embedding also on the last rank when the LM head is tied to it), the modules after them on the last
rank; the others become :class:`PPMissingLayer` and their weights are skipped at load.

The HF body still runs its whole ``forward`` on every rank; what it computes around missing modules is
discarded: on a later rank a pre-hook hands this rank's first layer the hidden states received from the
previous rank (so scaling or position embeddings the body applies to ``inputs_embeds`` are never applied
twice), and on an earlier rank a hook takes the last layer's output as the hidden states to send. HF
decoder layers carry the residual inside, so ``{"hidden_states": ...}`` is all that crosses ranks.

Decode step: at the ends of this rank's layers: a pre-hook on the first hands it the received
hidden states, a hook on the last keeps what is sent (``IntermediateTensors``).
"""
from __future__ import annotations

import inspect
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from .tp_plan import collect_plan


class PipelineError(ValueError):
    """The model cannot be split into pipeline stages (the message says why)."""


class PPMissingLayer(nn.Module):
    """Stands in for a module that lives on another pipeline rank: returns its first input; in place of a
    decoder layer (``stage`` given), as a 1-tuple when the model's layers return tuples (their caller then
    takes ``[0]``)."""

    def __init__(self, stage: Optional["PipelineStage"] = None, replaces: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.__dict__["_stage"] = stage  # a plain reference, not a submodule
        if replaces is not None:
            # Plain attributes the body's loop may read from a layer (4.57's decoder_layer.attention_type).
            for key, value in vars(replaces).items():
                if not key.startswith("_") and key != "training" and not isinstance(value, (nn.Module, torch.Tensor)):
                    self.__dict__[key] = value

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        value = args[0] if args else next(iter(kwargs.values()), None)
        stage = self.__dict__["_stage"]
        return (value,) if stage is not None and stage.layer_returns_tuple else value


def collect_pp_plan(hf_model: nn.Module, body: nn.Module, body_name: str, text_config: Any) -> Dict[str, Any]:
    """The body's pp_plan, keys relative to the body, in forward order; entries of the top model under
    ``body_name`` are re-rooted on the body, the others (``lm_head``) belong to the head."""
    return collect_plan(hf_model, body, body_name, text_config, "pp", later_wins=False)


class PipelineStage:
    """This rank's part of the body, and the hidden states it receives and sends."""

    def __init__(self, rank: int, size: int, start_layer: int, end_layer: int) -> None:
        self.start_layer, self.end_layer = start_layer, end_layer
        self.is_first, self.is_last = rank == 0, rank == size - 1
        #: Body-relative names of the modules replaced by PPMissingLayer.
        self.missing: List[str] = []
        self.layer_returns_tuple = False
        self.received: Optional[torch.Tensor] = None  # [1, tokens, hidden] from the previous rank
        self.sent: Optional[torch.Tensor] = None  # [1, tokens, hidden] for the next rank

    def _take_received(self, module: nn.Module, args: Tuple, kwargs: Dict[str, Any]):
        if self.received is None:
            raise PipelineError("pipeline stage ran without the previous rank's hidden states")
        if args:
            args = (self.received,) + tuple(args[1:])
        else:
            kwargs = {**kwargs, "hidden_states": self.received}
        return args, kwargs

    def _keep_sent(self, module: nn.Module, args: Tuple, kwargs: Dict[str, Any], output: Any) -> None:
        self.layer_returns_tuple = isinstance(output, tuple)
        self.sent = output[0] if isinstance(output, tuple) else output


def _returns_tuple_hint(layer: nn.Module) -> bool:
    """First guess of the layers' return form (learned for sure from the first real layer that runs)."""
    try:
        annotation = inspect.signature(type(layer).forward).return_annotation
    except (TypeError, ValueError):
        return False
    return "tuple" in str(annotation).lower()


def plan_modules(body: nn.Module, plan: Dict[str, Any], num_layers: int) -> Tuple[Dict[str, nn.Module], str]:
    """The modules a pp_plan names (in its order) and the name of the decoder-layer list among them; raises
    :class:`PipelineError` for a plan the body cannot be split by (also ``check``'s verdict)."""
    names = list(plan)
    absent = []
    modules = {}
    for name in names:
        try:
            modules[name] = body.get_submodule(name)
        except AttributeError:
            absent.append(name)
    if absent:
        raise PipelineError(f"pp_plan names {', '.join(map(repr, absent))}, which {type(body).__name__} does not have")
    lists = [name for name in names if isinstance(modules[name], nn.ModuleList)]
    if len(lists) != 1:
        raise PipelineError(f"{type(body).__name__}'s pp_plan must name exactly one nn.ModuleList (the decoder "
                            f"layers); it names {lists or 'none'} among {names}")
    layers_name = lists[0]
    if len(modules[layers_name]) != num_layers:
        raise PipelineError(f"{layers_name} holds {len(modules[layers_name])} layers but the config says "
                            f"num_hidden_layers={num_layers}; vLLM sizes the KV caches by the latter")
    return modules, layers_name


def split_body(body: nn.Module, plan: Dict[str, Any], num_layers: int, rank: int, size: int,
               keep_input_embedding_on_last: bool) -> PipelineStage:
    """Replaces the modules other ranks hold with :class:`PPMissingLayer` and hooks the hand-over."""
    from vllm.distributed.utils import get_pp_indices

    modules, layers_name = plan_modules(body, plan, num_layers)
    names = list(modules)
    layers = modules[layers_name]
    start, end = get_pp_indices(num_layers, rank, size)
    if end <= start:
        raise PipelineError(f"pipeline rank {rank} of {size} gets no layer of {num_layers}")
    stage = PipelineStage(rank, size, start, end)
    stage.layer_returns_tuple = _returns_tuple_hint(layers[start])
    split = names.index(layers_name)
    embedding = body.get_input_embeddings() if hasattr(body, "get_input_embeddings") else None
    for name in names[:split]:
        keep = stage.is_first or (stage.is_last and keep_input_embedding_on_last and modules[name] is embedding)
        if not keep:
            _replace(body, name, stage)
    for name in names[split + 1:]:
        if not stage.is_last:
            _replace(body, name, stage)
    for index in range(num_layers):
        if not start <= index < end:
            layers[index] = PPMissingLayer(stage, replaces=layers[index])
            stage.missing.append(f"{layers_name}.{index}")
    if not stage.is_first:
        layers[start].register_forward_pre_hook(stage._take_received, with_kwargs=True)
    layers[end - 1].register_forward_hook(stage._keep_sent, with_kwargs=True)
    return stage


def _replace(body: nn.Module, name: str, stage: PipelineStage) -> None:
    """A module outside the layer list (embedding, dropout, final norm): returns its input as is."""
    parent_name, _, attr = name.rpartition(".")
    parent = body.get_submodule(parent_name) if parent_name else body
    setattr(parent, attr, PPMissingLayer())
    stage.missing.append(name)


def pp_rank_and_size() -> Tuple[int, int]:
    """This process's pipeline rank and the number of pipeline ranks (vLLM's pipeline group)."""
    from vllm.distributed import get_pp_group

    group = get_pp_group()
    return group.rank_in_group, group.world_size


def is_missing_weight(candidates: List[str], missing_prefixes: List[str]) -> bool:
    """Whether a checkpoint tensor (its candidate model names) belongs to a module of another rank."""
    return any(name.startswith(prefix) for name in candidates for prefix in missing_prefixes)
