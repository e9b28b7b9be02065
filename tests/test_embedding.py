"""Encoder-only models and pooling: ``runner="pooling"`` / ``task="embed"``, ``LLM.embed`` on the CPU engine.

References are HF ``AutoModel`` run on each prompt alone (no padding), pooled the same way, and, for
the real all-MiniLM-L6-v2, sentence-transformers' own ``encode``.
"""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import List, Sequence

import pytest
import torch

from tests import helpers

#: Mixed lengths, two of them equal (one batch of the encoder), every prompt in one engine step.
PROMPTS: List[List[int]] = [
    [0, 5, 7, 9, 11, 2],
    [0, 3, 2],
    [0] + [4 + (i * 7) % 25 for i in range(40)] + [2],
    [0, 8, 8, 9, 10, 2],
    [0, 12, 13, 14, 15, 16, 17, 18, 19, 20, 2],
]


def _encoder_checkpoint(name: str, path: Path) -> Path:
    import transformers

    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2)
    torch.manual_seed(0)
    if name == "bert":
        model = transformers.BertForMaskedLM(transformers.BertConfig(vocab_size=64, max_position_embeddings=128, **common))
    elif name == "roberta":
        # positions start after padding_idx=1: 130 table rows, 128 usable
        model = transformers.RobertaForMaskedLM(transformers.RobertaConfig(
            vocab_size=64, max_position_embeddings=130, pad_token_id=1, **common))
    else:
        # ESM-2: rotary positions, masked-token dropout scaling (token 32 is <mask>)
        model = transformers.EsmForMaskedLM(transformers.EsmConfig(
            vocab_size=33, max_position_embeddings=130, position_embedding_type="rotary", pad_token_id=1,
            mask_token_id=32, token_dropout=True, **common))
    model.eval().save_pretrained(path, safe_serialization=True)
    return path


def _prompts_for(name: str) -> List[List[int]]:
    if name != "esm":
        return PROMPTS
    # include ESM's <mask> (32) so the token-dropout scaling is exercised
    return [p if i != 0 else p[:3] + [32] + p[3:] for i, p in enumerate(PROMPTS)]


def hf_pooled(path: Path, prompts: Sequence[Sequence[int]], pooling: str, normalize: bool) -> torch.Tensor:
    import transformers

    model = transformers.AutoModel.from_pretrained(path, torch_dtype=torch.float32).eval()
    rows = []
    with torch.no_grad():
        for prompt in prompts:
            hidden = model(input_ids=torch.tensor([list(prompt)])).last_hidden_state[0]
            row = {"CLS": hidden[0], "LAST": hidden[-1], "MEAN": hidden.mean(0)}[pooling]
            rows.append(torch.nn.functional.normalize(row, dim=0) if normalize else row)
    return torch.stack(rows)


def vllm_embed(llm, prompts: Sequence[Sequence[int]]) -> torch.Tensor:
    outputs = llm.embed([{"prompt_token_ids": list(p)} for p in prompts], use_tqdm=False)
    return torch.tensor([o.outputs.embedding for o in outputs])


@pytest.mark.parametrize("name", ["bert", "roberta", "esm"])
def test_encoder_embeddings_equal_hf(tmp_path, name):
    path = _encoder_checkpoint(name, tmp_path / name)
    kwargs = dict(runner="pooling", max_model_len=128)
    if not helpers.interface_supported(name):
        since = helpers.INTERFACE_SINCE[name]
        with pytest.raises(ValueError, match=rf"attention interface.*transformers>={since}"):
            with helpers.Engine(path, **kwargs):
                pass
        return
    prompts = _prompts_for(name)
    with helpers.Engine(path, **kwargs) as llm:
        got = vllm_embed(llm, prompts)
    want = hf_pooled(path, prompts, "CLS", normalize=True)
    assert got.shape == want.shape
    assert (got - want).abs().max().item() < 1e-5


def test_mean_pooling_override_and_task_embed(tmp_path):
    """``task="embed"`` means runner="pooling"; ``override_pooler_config`` replaces the default pooling."""
    # ESM before 4.56 has no SDPA class to route (test_encoder_embeddings_equal_hf checks its error): BERT there
    name = "esm" if helpers.interface_supported("esm") else "bert"
    path = _encoder_checkpoint(name, tmp_path / name)
    prompts = _prompts_for(name)
    with helpers.Engine(path, task="embed", max_model_len=128,
                        override_pooler_config={"pooling_type": "MEAN", "normalize": False}) as llm:
        got = vllm_embed(llm, prompts)
    want = hf_pooled(path, prompts, "MEAN", normalize=False)
    assert (got - want).abs().max().item() < 1e-5


def test_decoder_embeddings_equal_hf(tmp_path):
    """A causal checkpoint as an embedding model: LAST pooling over the paged-attention prefill, lm_head
    ignored, and vLLM's generate refuses the pooling engine."""
    path = helpers.build_checkpoint("llama", tmp_path / "llama")
    prompts = helpers.PROMPTS
    with helpers.Engine(path, runner="pooling") as llm:
        got = vllm_embed(llm, prompts)
        with pytest.raises(ValueError, match="only supported for .*generation"):
            llm.generate([{"prompt_token_ids": prompts[0]}])
    want = hf_pooled(path, prompts, "LAST", normalize=True)
    assert (got - want).abs().max().item() < 1e-5


def test_encoder_refused_for_generation(tmp_path):
    """A BERT masked-LM checkpoint (runner auto: generate) gets an error naming runner='pooling'."""
    path = _encoder_checkpoint("bert", tmp_path / "bert")
    with pytest.raises(ValueError, match="encoder-only model.*runner='pooling'"):
        with helpers.Engine(path, max_model_len=128):
            pass


def test_minilm_matches_sentence_transformers():
    """The real all-MiniLM-L6-v2 (sentence-transformers layout: MEAN pooling, Normalize) vs
    sentence-transformers' encode, with its tokenizer, on sentences of mixed lengths."""
    path = helpers.bundled_model("all-MiniLM-L6-v2")
    if path is None:
        pytest.fail("the bundled all-MiniLM-L6-v2 is missing: run scripts/setup_cpu_env.sh")
    from sentence_transformers import SentenceTransformer

    sentences = [
        "A man is eating food.",
        "A man is eating a piece of bread.",
        "The girl is carrying a baby.",
        "A man is riding a horse.",
        "A woman is playing violin.",
        "Two men pushed carts through the woods.",
        "A man is riding a white horse on an enclosed ground.",
        "A monkey is playing drums.",
        "Paris is the capital of France, and it is known for the Eiffel Tower, museums and cafes.",
        "Hi",
        "The quick brown fox jumps over the lazy dog while the farmer watches from a distance, "
        "wondering whether the fence needs repairs before the winter storms arrive.",
        "Embeddings map sentences to vectors.",
    ]
    with helpers.Engine(path, runner="pooling", skip_tokenizer_init=False) as llm:
        got = torch.tensor([o.outputs.embedding for o in llm.embed(sentences, use_tqdm=False)])
    want = torch.from_numpy(SentenceTransformer(str(path), device="cpu").encode(sentences))
    cosine = torch.nn.functional.cosine_similarity(got, want.to(got.dtype), dim=1)
    assert cosine.min().item() > 0.9999, cosine
    assert torch.allclose(got.norm(dim=1), torch.ones(len(sentences)), atol=1e-5)  # Normalize module applied


# --- units: pooling, the sentence-transformers layout, options ----------------------------------------

def test_pooler_types_match_a_per_prompt_loop():
    from vllm_transformers_backend.pooling import EmbeddingPooler

    torch.manual_seed(0)
    lens = torch.tensor([3, 1, 5])
    hidden = torch.randn(int(lens.sum()), 8)
    chunks = torch.split(hidden, lens.tolist())
    expected = {"CLS": [c[0] for c in chunks], "LAST": [c[-1] for c in chunks], "MEAN": [c.mean(0) for c in chunks]}
    for kind, rows in expected.items():
        got = EmbeddingPooler(kind, normalize=False).pool(hidden, lens)
        assert torch.allclose(got, torch.stack(rows), atol=1e-6), kind
        normed = EmbeddingPooler(kind, normalize=True).pool(hidden, lens)
        assert torch.allclose(normed, torch.nn.functional.normalize(torch.stack(rows), dim=1), atol=1e-6), kind


def _st_layout(path: Path, pooling: dict, modules: List[str]) -> Path:
    import json

    path.mkdir()
    entries = [{"idx": i, "name": str(i), "path": "" if m == "Transformer" else f"{i}_{m}",
                "type": f"sentence_transformers.models.{m}"} for i, m in enumerate(modules)]
    (path / "modules.json").write_text(json.dumps(entries))
    pooling_dir = path / f"{modules.index('Pooling')}_Pooling"
    pooling_dir.mkdir()
    (pooling_dir / "config.json").write_text(json.dumps({"word_embedding_dimension": 8, **pooling}))
    return path


def test_sentence_transformers_layout_is_read(tmp_path):
    from vllm_transformers_backend.base import BackendError
    from vllm_transformers_backend.pooling import sentence_transformers_pooling

    mean = _st_layout(tmp_path / "mean", {"pooling_mode_mean_tokens": True}, ["Transformer", "Pooling", "Normalize"])
    assert sentence_transformers_pooling(str(mean)) == ("MEAN", True)
    last = _st_layout(tmp_path / "last", {"pooling_mode_lasttoken": True}, ["Transformer", "Pooling"])
    assert sentence_transformers_pooling(str(last)) == ("LAST", False)
    assert sentence_transformers_pooling(str(tmp_path)) is None  # no modules.json
    dense = _st_layout(tmp_path / "dense", {"pooling_mode_cls_token": True}, ["Transformer", "Pooling", "Dense"])
    with pytest.raises(BackendError, match="Dense"):
        sentence_transformers_pooling(str(dense))
    maxpool = _st_layout(tmp_path / "max", {"pooling_mode_max_tokens": True}, ["Transformer", "Pooling"])
    with pytest.raises(BackendError, match="override_pooler_config"):
        sentence_transformers_pooling(str(maxpool))


def test_runner_task_and_pooler_options():
    from vllm.engine.arg_utils import AsyncEngineArgs, EngineArgs
    from vllm.entrypoints.openai.cli_args import make_arg_parser
    from vllm.utils import FlexibleArgumentParser

    assert EngineArgs(model="m", task="embed").runner == "pooling"
    assert EngineArgs(model="m").runner == "auto"
    with pytest.raises(ValueError, match="disagree"):
        EngineArgs(model="m", runner="generate", task="embed")
    with pytest.raises(ValueError, match="Unknown runner"):
        EngineArgs(model="m", runner="embedding")
    with pytest.raises(ValueError, match="not one of CLS, MEAN, LAST"):
        EngineArgs(model="m", override_pooler_config={"pooling_type": "MAX"})
    args = make_arg_parser(FlexibleArgumentParser()).parse_args(
        ["--model", "m", "--runner", "pooling", "--override-pooler-config", '{"pooling_type": "mean"}'])
    engine_args = AsyncEngineArgs.from_cli_args(args)
    assert engine_args.runner == "pooling"
    assert engine_args.override_pooler_config == '{"pooling_type": "mean"}'
    from vllm_transformers_backend.options import validate_pooler_override

    assert validate_pooler_override(engine_args.override_pooler_config).pooling_type == "MEAN"


def test_embed_on_a_generating_engine_names_the_runner():
    from vllm import LLM

    engine = SimpleNamespace(llm_engine=SimpleNamespace(model_config=SimpleNamespace(embedding_mode=False)))
    with pytest.raises(ValueError, match="runner='pooling'"):
        LLM.embed(engine, ["hello"])


def test_default_runner_follows_the_architecture_name():
    from vllm_transformers_backend.options import default_runner

    assert default_runner(["LlamaForCausalLM"], False) == "generate"
    assert default_runner(["GPT2LMHeadModel"], False) == "generate"
    assert default_runner(["BertModel"], False) == "pooling"
    assert default_runner(["EsmForMaskedLM"], False) == "generate"  # runner='pooling' must be asked for
    assert default_runner(["LlamaForCausalLM"], True) == "pooling"  # vLLM's own embedding architecture


def test_encoder_without_causal_class_names_the_pooling_runner(tmp_path):
    """ESM has no causal-LM class: asking it to generate names runner='pooling'."""
    path = _encoder_checkpoint("esm", tmp_path / "esm")
    # every release: the class lookup fails before attention matters (4.x's refusal of ESM's attention comes
    # with runner='pooling': test_encoder_embeddings_equal_hf)
    with pytest.raises(ValueError, match="no AutoModelForCausalLM class.*runner='pooling'"):
        with helpers.Engine(path, max_model_len=128):
            pass
