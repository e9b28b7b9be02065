"""The lean body forward (``body_forward.py``): which bodies it takes, that the engine runs it (HF's body forward
called only on the first forward, where the two are compared) and generates HF's tokens with it, that a body
doing more than ``norm(layers(embed(ids)))`` is caught by that comparison, and that switching it off or
live-model access puts HF's body back."""
from __future__ import annotations

import pytest

from tests.helpers import PROMPTS, Engine, hf_greedy, interface_supported, require_architecture, vllm_greedy
from vllm_transformers_backend.body_forward import BODY_ENV
from vllm_transformers_backend.layers import ScaledVocabParallelEmbedding
from vllm_transformers_backend.live import backend_model, get_hf_model

#: Bodies whose layers all run vLLM's way and whose forward is norm(layers(embed(ids))).
LEAN = {"llama", "qwen2", "mistral"}
#: Bodies the first forward's comparison refuses where the body's forward scales the embeddings by
#: sqrt(hidden_size): Gemma before transformers 5. From 5.0 the scale lives in GemmaTextScaledWordEmbedding
#: (kept by ScaledVocabParallelEmbedding), the body is plain and its lean forward is exact: then it is LEAN.
CHECK_REFUSES = {"gemma": "does more than norm(layers(embed(ids)))"}
#: Bodies whose layers keep some HF code (so the pass does not take them at build).
NOT_TAKEN = {"gemma2": "residual pass", "granite": "residual pass", "qwen3": "attention_forward pass",
             "olmo2": "residual pass"}


def _report(llm):
    return next(r for r in backend_model(llm).speed_passes if r.name == "body_forward")


def _count_body_forwards(llm, monkeypatch):
    body = backend_model(llm).model
    cls = type(body)
    calls = []
    original = cls.forward
    monkeypatch.setattr(cls, "forward", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    return calls


@pytest.mark.parametrize("arch", sorted(LEAN | set(CHECK_REFUSES) | set(NOT_TAKEN)))
def test_engine_runs_the_lean_body_where_it_gives_hf_output(arch, checkpoints, monkeypatch):
    """Batches mixing prompt lengths, decode steps and prompts joining mid-decode (max_num_seqs=3)."""
    require_architecture(arch)
    if not interface_supported(arch):
        pytest.skip(f"{arch} has no attention interface in this transformers")
    monkeypatch.delenv(BODY_ENV, raising=False)
    path = checkpoints(arch)
    expected = hf_greedy(path, PROMPTS, 10)
    with Engine(path, "transformers", max_num_seqs=3) as llm:
        model = backend_model(llm)
        calls = _count_body_forwards(llm, monkeypatch)
        assert vllm_greedy(llm, PROMPTS, 10) == expected
        report = _report(llm)
        lean = model._lean_body
        scale_in_embedding = isinstance(model.model.embed_tokens, ScaledVocabParallelEmbedding)
        if arch in LEAN or (arch in CHECK_REFUSES and scale_in_embedding):
            assert lean is not None and lean.state == "on", (arch, lean and lean.problem)
            assert len(calls) == 1, f"{arch}: HF's body forward ran {len(calls)} times (only the first forward)"
            assert report.replaced == 1 and not report.kept, report.line()
        elif arch in CHECK_REFUSES:
            assert lean is not None and lean.state == "off" and CHECK_REFUSES[arch] in lean.problem, lean.problem
            assert report.replaced == 0 and CHECK_REFUSES[arch] in report.line(), report.line()
            assert len(calls) > 1  # HF's body kept running
        else:
            assert lean is None and report.replaced == 0 and NOT_TAKEN[arch] in report.line(), report.line()


def test_switched_off_and_live_access_put_hf_body_back(checkpoints, monkeypatch):
    path = checkpoints("qwen2")
    expected = hf_greedy(path, PROMPTS, 8)
    monkeypatch.setenv(BODY_ENV, "0")
    with Engine(path, "transformers") as llm:
        assert backend_model(llm)._lean_body is None and _report(llm).status == "off"
        assert vllm_greedy(llm, PROMPTS, 8) == expected
    monkeypatch.delenv(BODY_ENV)
    with Engine(path, "transformers") as llm:
        body = get_hf_model(llm, hf_layer_outputs=False)  # even keeping fused layers, hooks must fire
        seen = []
        handle = body.layers[1].mlp.register_forward_hook(lambda mod, args, out: seen.append(out.shape))
        assert backend_model(llm)._lean_body is None and _report(llm).status == "undone"
        assert vllm_greedy(llm, PROMPTS, 8) == expected
        handle.remove()
        assert seen, "the MLP's hook did not fire after live-model access"


def test_without_a_rotary_table_the_body_stays_hf(checkpoints, monkeypatch):
    monkeypatch.delenv(BODY_ENV, raising=False)
    monkeypatch.setenv("VLLM_TRANSFORMERS_BACKEND_ROTARY_TABLE", "0")
    path = checkpoints("llama")
    expected = hf_greedy(path, PROMPTS, 8)
    with Engine(path, "transformers") as llm:
        assert backend_model(llm)._lean_body is None and "rotary_table" in _report(llm).line()
        assert vllm_greedy(llm, PROMPTS, 8) == expected


def test_a_body_doing_more_is_caught_by_the_first_forward(checkpoints, monkeypatch):
    """A body forward that does more than norm(layers(embed(ids))) (here an affine step after the final norm, as
    a remote-code body might add) keeps running on every transformers version: the first forward's exact
    comparison refuses the lean body, and the engine gives the modified model's tokens."""
    import transformers

    monkeypatch.delenv(BODY_ENV, raising=False)
    original = transformers.LlamaModel.forward

    def more(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        if isinstance(out, tuple):  # the backend asks for tuples
            return (out[0] * 1.5 + 0.25,) + tuple(out[1:])
        out.last_hidden_state = out.last_hidden_state * 1.5 + 0.25
        return out

    monkeypatch.setattr(transformers.LlamaModel, "forward", more)
    path = checkpoints("llama")
    expected = hf_greedy(path, PROMPTS, 8)
    with Engine(path, "transformers", max_num_seqs=3) as llm:
        calls = _count_body_forwards(llm, monkeypatch)
        assert vllm_greedy(llm, PROMPTS, 8) == expected
        lean = backend_model(llm)._lean_body
        assert lean is not None and lean.state == "off", lean and lean.state
        assert CHECK_REFUSES["gemma"] in lean.problem and CHECK_REFUSES["gemma"] in _report(llm).line()
        assert len(calls) > 1  # HF's (modified) body kept running


@pytest.mark.parametrize("body", ["plain", "doing more"])
def test_the_first_forward_returns_hf_output_on_the_device_either_way(body, checkpoints, monkeypatch):
    """The check gets HF's output off the device (the first forward is vLLM's memory profile) and returns the
    forward's output on the device: the lean one where it equals HF's, else HF's own, exactly."""
    import torch
    import transformers

    from vllm_transformers_backend import body_forward

    monkeypatch.delenv(BODY_ENV, raising=False)
    if body == "doing more":
        original = transformers.LlamaModel.forward

        def more(self, *args, **kwargs):  # as in the test above: an affine step after the final norm
            out = original(self, *args, **kwargs)
            if isinstance(out, tuple):
                return (out[0] * 1.5 + 0.25,) + tuple(out[1:])
            out.last_hidden_state = out.last_hidden_state * 1.5 + 0.25
            return out

        monkeypatch.setattr(transformers.LlamaModel, "forward", more)
    checks = []
    check = body_forward.LeanBody.check

    def recording(self, make_context, input_ids, positions, hf_hidden, device):
        out = check(self, make_context, input_ids, positions, hf_hidden, device)
        checks.append((hf_hidden.clone(), out, device, self.state))
        return out

    monkeypatch.setattr(body_forward.LeanBody, "check", recording)
    path = checkpoints("llama")
    expected = hf_greedy(path, PROMPTS, 4)
    with Engine(path, "transformers") as llm:  # the CPU engine has no profiling run: the first forward is this
        assert vllm_greedy(llm, PROMPTS, 4) == expected
    (reference, out, device, state), = checks
    assert reference.device.type == "cpu"
    assert state == ("on" if body == "plain" else "off")
    assert out.device == device and torch.equal(out.cpu(), reference)
