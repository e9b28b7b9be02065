"""Token type ids (BERT's segment ids) through vLLM 0.6.2, which has no field for them.

A cross-encoder reads ``[CLS] query [SEP] document [SEP]`` with token type 0 for the query part and 1 for
the document part; HF's tokenizer returns them as ``token_type_ids``. vLLM 0.6.2's prompts carry token ids
only, so the types travel as newer vLLM carries them:

1. the frontend (``LLM.score``, the server's ``/score``) compresses them to the index of the first type-1
   token (pair tokenizers emit ``0...0 1...1``) and puts it in the request's ``PoolingParams.additional_data``;
2. the model runner (the GPU ``EmbeddingModelRunner`` through the embedding_runner patch, the CPU one through
   cpu_embedding) ORs the type into the high bits of the step's flattened input ids
   (``id | type << TOKEN_TYPE_SHIFT``), so the types reach every tensor-parallel rank with the ids;
3. the model splits them again (:func:`split_token_types`) before the embedding lookup.

The prompt itself, and what input validation or the outputs see, keep the plain ids.

Decode step: none (prompts only); a cross-encoder's prompt step carries the types in the input ids'
high bits, split off again before the body runs.
"""
from __future__ import annotations

from typing import Any, List, Mapping, Optional, Sequence, Tuple

import torch

from ._logging import get_logger

logger = get_logger(__name__)

#: Bit where the token type starts in an encoded input id (vocabularies stay far below 2**30).
TOKEN_TYPE_SHIFT = 30
_ID_MASK = (1 << TOKEN_TYPE_SHIFT) - 1
#: Key of the backend's entry in ``PoolingParams.additional_data``.
ADDITIONAL_DATA_KEY = "vllm_transformers_backend"
_TYPE_START = "token_type_start"


def compress(token_type_ids: Sequence[int]) -> Optional[int]:
    """The index of the first type-1 token, None when every type is 0. Refuses other patterns (a pair
    tokenizer emits ``0...0 1...1``; anything else could not be carried)."""
    types = list(token_type_ids)
    if not any(types):
        return None
    start = types.index(1) if 1 in types else -1
    if start < 0 or any(t != 0 for t in types[:start]) or any(t != 1 for t in types[start:]):
        raise ValueError(f"token_type_ids {types} are not of the form 0...0 1...1; the backend carries pair "
                         "segment ids only.")
    return start


def backend_data(pooling_params: Any) -> Mapping[str, Any]:
    """The backend's entry of a request's ``PoolingParams.additional_data`` (empty when absent)."""
    data = getattr(pooling_params, "additional_data", None)
    entry = data.get(ADDITIONAL_DATA_KEY) if isinstance(data, Mapping) else None
    return entry if isinstance(entry, Mapping) else {}


def with_backend_data(pooling_params: Any, **values: Any) -> Any:
    """A copy of ``pooling_params`` (a fresh ``PoolingParams`` when None) whose backend entry has ``values``."""
    from vllm.pooling_params import PoolingParams

    data = getattr(pooling_params, "additional_data", None)
    data = dict(data) if isinstance(data, Mapping) else ({} if data is None else {"user": data})
    entry = dict(backend_data(pooling_params))
    entry.update({k: v for k, v in values.items() if v is not None})
    data[ADDITIONAL_DATA_KEY] = entry
    return PoolingParams(additional_data=data)


def type_start_of(pooling_params: Any, prompt_len: int) -> Optional[int]:
    """The request's first type-1 position, None without one. A malformed value (only a hand-written
    ``additional_data`` can hold one) is ignored with a warning: raising here would stop the engine."""
    start = backend_data(pooling_params).get(_TYPE_START)
    if start is None:
        return None
    if not isinstance(start, int) or isinstance(start, bool) or not 0 < start < prompt_len:
        logger.warning("ignoring %s=%r for a prompt of %d tokens", _TYPE_START, start, prompt_len)
        return None
    return start


def type_start_data(token_type_ids: Optional[Sequence[int]]) -> dict:
    """Keyword arguments for :func:`with_backend_data` that carry ``token_type_ids``."""
    start = compress(token_type_ids) if token_type_ids is not None else None
    return {_TYPE_START: start} if start is not None else {}


def encode_into_input_ids(input_ids: torch.Tensor, seq_lens: Sequence[int], pooling_params: Sequence[Any]) -> None:
    """Runner side: ORs each prompt's token types into its ids in the flattened step (in place).

    ``seq_lens`` and ``pooling_params`` follow the step's sequence order (one sequence per group, as in
    vLLM's embedding runners)."""
    if len(seq_lens) != len(pooling_params):
        return
    offset = 0
    for length, params in zip(seq_lens, pooling_params):
        start = type_start_of(params, length)
        if start is not None:
            input_ids[offset + start:offset + length] |= 1 << TOKEN_TYPE_SHIFT
        offset += length


def split_token_types(input_ids: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Model side: (plain ids, token types or None when every type is 0)."""
    types = input_ids >> TOKEN_TYPE_SHIFT
    if not bool(types.any()):
        return input_ids, None
    return input_ids & _ID_MASK, types


def pooling_params_of(seq_group_metadata_list: Sequence[Any]) -> List[Any]:
    return [getattr(m, "pooling_params", None) for m in seq_group_metadata_list]
