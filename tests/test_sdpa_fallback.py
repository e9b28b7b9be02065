"""Outside the engine (no attention context) the "vllm" attention function falls back to SDPA."""
from __future__ import annotations

import torch

from tests.helpers import Engine, vllm_model


def test_sdpa_fallback_outside_the_engine(checkpoints):
    """The HF body inside the backend, called without an attention context, equals plain HF."""
    from transformers import AutoModel

    path = checkpoints("llama")
    reference = AutoModel.from_pretrained(path, torch_dtype=torch.float32).eval()
    ids = torch.tensor([[1, 5, 7, 9, 11, 13, 200, 300]])
    with torch.no_grad():
        expected = reference(input_ids=ids).last_hidden_state
    with Engine(path, "transformers") as llm:
        body = vllm_model(llm).model
        with torch.no_grad():
            got = body(input_ids=ids, position_ids=torch.arange(ids.shape[1])[None]).last_hidden_state
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
