"""`vllm serve` with a sequence-classification checkpoint: /classify, /pooling, /score (/v1/score) and
/rerank (/v1/rerank) with newer vLLM's request and response shapes, against HF's logits (float32, 1e-5), 50
concurrent requests against the sequential answers, and 400s for bad requests. One server per module: a
BERT cross-encoder (its pairs carry token types) where transformers runs BERT (5.x), else a Llama reward
model."""
from __future__ import annotations

import concurrent.futures

import pytest
import torch

from tests import helpers
from tests import seq_cls_models as models

DOCUMENTS = [d for _, d in models.PAIRS]
QUERY = models.PAIRS[0][0]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    name = "bert"  # (every release of the matrix runs BERT: through the interface or routed)
    root = tmp_path_factory.mktemp("serve")
    path = models.build(name, root / name, id2label={0: "relevant"})
    args = ["--model-impl", "transformers", "--task", "score", "--dtype", "float32", "--served-model-name", "ce",
            "--max-model-len", "128"]
    with helpers.vllm_server(path, args, root / "server.log") as base:
        yield base, path


def _post(base: str, route: str, body: dict, expect: int = 200) -> dict:
    import httpx

    response = httpx.post(f"{base}{route}", json=body, timeout=120)
    assert response.status_code == expect, response.text
    return response.json()


def test_classify_route_equals_hf(served):
    import transformers

    base, path = served
    texts = ["How old are you?", "Hi", "Paris is the capital of France, and it is known for its museums."]
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    prompts = [tokenizer(t)["input_ids"] for t in texts]
    want = models.hf_logits(path, prompts)[:, 0]
    answer = _post(base, "/classify", {"model": "ce", "input": texts})
    assert answer["object"] == "list" and answer["model"] == "ce" and answer["id"].startswith("classify-")
    assert [d["index"] for d in answer["data"]] == [0, 1, 2]
    assert all(d["label"] == "relevant" and d["num_classes"] == 1 for d in answer["data"])
    got = torch.tensor([d["probs"][0] for d in answer["data"]])
    assert (got - torch.sigmoid(want)).abs().max().item() < 1e-5
    assert answer["usage"]["prompt_tokens"] == sum(len(p) for p in prompts)
    raw = _post(base, "/classify", {"input": prompts[1], "use_activation": False})  # token ids, no model name
    assert abs(raw["data"][0]["probs"][0] - want[1].item()) < 1e-5
    pooled = _post(base, "/pooling", {"input": prompts})  # the reward: raw logits, like LLM.reward
    assert pooled["id"].startswith("pool-") and [d["object"] for d in pooled["data"]] == ["pooling"] * 3
    assert (torch.tensor([d["data"][0] for d in pooled["data"]]) - want).abs().max().item() < 1e-5


def test_score_and_rerank_routes_equal_hf(served):
    base, path = served
    one_to_n = _post(base, "/score", {"model": "ce", "text_1": QUERY, "text_2": DOCUMENTS})
    want = torch.sigmoid(models.hf_pair_logits(path, [(QUERY, d) for d in DOCUMENTS])[:, 0])
    assert one_to_n["id"].startswith("score-") and [d["object"] for d in one_to_n["data"]] == ["score"] * 4
    assert (torch.tensor([d["score"] for d in one_to_n["data"]]) - want).abs().max().item() < 1e-5
    n_to_n = _post(base, "/v1/score", {"text_1": [q for q, _ in models.PAIRS], "text_2": DOCUMENTS,
                                       "use_activation": False})
    want_raw = models.hf_pair_logits(path, models.PAIRS)[:, 0]
    assert (torch.tensor([d["score"] for d in n_to_n["data"]]) - want_raw).abs().max().item() < 1e-5

    ranked = _post(base, "/rerank", {"model": "ce", "query": QUERY, "documents": DOCUMENTS, "top_n": 3})
    order = sorted(range(len(DOCUMENTS)), key=lambda i: want[i].item(), reverse=True)[:3]
    assert [r["index"] for r in ranked["results"]] == order
    assert [r["document"]["text"] for r in ranked["results"]] == [DOCUMENTS[i] for i in order]
    assert all(abs(r["relevance_score"] - want[r["index"]].item()) < 1e-5 for r in ranked["results"])
    assert ranked["usage"]["total_tokens"] > 0
    assert len(_post(base, "/v1/rerank", {"query": QUERY, "documents": DOCUMENTS})["results"]) == 4


def test_concurrent_requests_equal_sequential(served):
    """50 concurrent requests (classify, score and rerank mixed) give the sequential answers: the same
    labels, indices and rerank order, the same numbers up to float32 rounding (a prompt batched with
    others runs through GEMMs of another shape; 2.4e-7 seen)."""
    base, _ = served
    bodies = [("/classify", {"input": [f"question number {n}", "Hi"]}) for n in range(4)] + \
        [("/score", {"text_1": QUERY, "text_2": DOCUMENTS[n:]}) for n in range(3)] + \
        [("/rerank", {"query": f"query {n}", "documents": DOCUMENTS}) for n in range(3)]

    def ask(i: int):
        route, body = bodies[i % len(bodies)]
        items = _post(base, route, body)
        items = items.get("data") or items["results"]
        keys = [(item["index"], item.get("label")) for item in items]
        values = [v for item in items for v in item.get("probs") or [item.get("score", item.get("relevance_score"))]]
        return keys, torch.tensor(values)

    expected = [ask(i) for i in range(len(bodies))]
    with concurrent.futures.ThreadPoolExecutor(max_workers=50) as pool:
        answers = list(pool.map(ask, range(50)))
    for i, (keys, values) in enumerate(answers):
        want_keys, want_values = expected[i % len(bodies)]
        assert keys == want_keys, (i, keys, want_keys)
        assert (values - want_values).abs().max().item() < 1e-6, (i, values, want_values)


def test_bad_requests_get_400_and_the_server_goes_on(served):
    base, _ = served
    error = _post(base, "/score", {"text_1": ["a", "b"], "text_2": ["c", "d", "e"]}, expect=400)
    assert "1-to-1, 1-to-N or N-to-N" in error["message"]
    error = _post(base, "/classify", {"input": "word " * 300}, expect=400)
    assert "maximum context length is 128" in error["message"]
    assert _post(base, "/rerank", {"model": "other", "query": "q", "documents": ["d"]}, expect=404)
    assert _post(base, "/score", {"text_1": "q", "text_2": "d", "bogus": 1}, expect=400)
    assert len(_post(base, "/score", {"text_1": "q", "text_2": "d"})["data"]) == 1
