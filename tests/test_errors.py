"""Bad input gets a clear error naming the problem and the fix."""
from __future__ import annotations

import pytest
from packaging.version import Version

from tests.helpers import Engine


def test_transformers_older_than_4_48_is_refused(monkeypatch, checkpoints):
    from vllm_transformers_backend import compat

    path = checkpoints("llama")
    monkeypatch.setattr(compat, "transformers_version", lambda: Version("4.47.1"))
    with pytest.raises(compat.UnsupportedVersionError, match=r"transformers>=4\.48.*4\.47\.1.*pip install"):
        with Engine(path, "transformers"):
            pass


def test_attention_softcap_without_a_capable_backend(tmp_path):
    import torch
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=64, attn_logit_softcapping=30.0,
                          sliding_window=512, max_position_embeddings=512)
    torch.manual_seed(0)
    Gemma2ForCausalLM(config).save_pretrained(tmp_path)
    with pytest.raises(Exception, match="soft-capping.*FlashAttention and FlashInfer"):
        with Engine(tmp_path, "transformers"):
            pass


def test_bidirectional_sliding_window_beyond_max_len(tmp_path):
    """An encoder whose layers have windows (EmbeddingGemma-style Gemma 3): the backend's encoder attention has
    none, so it runs only where the window never applies. (Decoders apply their windows: test_sliding_window.)"""
    from tests.helpers import require_architecture

    require_architecture("gemma3")
    import torch
    import transformers
    from transformers import Gemma3TextConfig, Gemma3TextModel

    config = Gemma3TextConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=64, sliding_window=32,
                              max_position_embeddings=512, layer_types=["sliding_attention", "full_attention"],
                              use_bidirectional_attention=True)
    if config.sliding_window == 32:  # releases without it keep the window as given (and attend causally)
        pytest.skip(f"transformers {transformers.__version__}'s Gemma 3 has no bidirectional attention")
    torch.manual_seed(0)
    Gemma3TextModel(config).save_pretrained(tmp_path)
    with pytest.raises(Exception, match=r"bidirectional encoder with sliding-window layers \((\d+)\).*"
                                        r"max_model_len <= \1"):
        with Engine(tmp_path, "transformers", runner="pooling", max_model_len=128):
            pass
