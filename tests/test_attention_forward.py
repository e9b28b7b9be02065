"""The lean attention forward (``attention_forward.py``): which HF attention classes qualify (the CPU probe, on
the real classes and on variants with one extra step each), that the engine runs it (HF's forward never
called) and generates HF's tokens with it, and that switching it off or live-model access restores HF's
forward."""
from __future__ import annotations

import pytest
import torch

from tests.helpers import (ARCHITECTURES, PROMPTS, Engine, hf_greedy, interface_supported, require_architecture,
                           vllm_greedy)
from vllm_transformers_backend.attention import ATTN_IMPLEMENTATION, register_attention_function
from vllm_transformers_backend.attention_forward import ATTENTION_ENV, is_lean, standard_attention_problem
from vllm_transformers_backend.live import backend_model, get_hf_model

#: Attention classes whose forward is the standard one (q/k/v, NeoX rotation, attention, o_proj).
LEAN = {"llama", "qwen2", "mistral", "gemma", "gemma2", "granite"}
#: Attention classes with a step the lean forward does not do (GPT-2, GPT-NeoX and OPT are no sites at all:
#: no separate q/k/v or no rotation through vLLM's kernel).
KEPT = {"qwen3": "q/k norms", "olmo2": "q/k norms", "gemma3": "q/k norms", "cohere": "interleaved rotation"}


def _attention_module(arch: str, **overrides):
    import transformers

    factory, _ = ARCHITECTURES[arch]
    config = factory()
    for name, value in overrides.items():
        setattr(config, name, value)
    register_attention_function()  # the probe runs the forward as the engine does: through "vllm"
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=ATTN_IMPLEMENTATION).eval()
    return model.model.layers[0].self_attn


def _problem(module) -> str | None:
    q, k, v, o = module.q_proj, module.k_proj, module.v_proj, module.o_proj
    return standard_attention_problem(module, (q.out_features, k.out_features, v.out_features), module.head_dim,
                                      q.in_features, o.out_features, q.bias is not None, o.bias is not None)


@pytest.mark.parametrize("arch", sorted(LEAN | set(KEPT)))
def test_probe_accepts_the_standard_attention_classes_only(arch):
    require_architecture(arch)
    problem = _problem(_attention_module(arch))
    if arch in LEAN:
        assert problem is None, f"{arch}: {problem}"
    else:
        assert problem is not None, f"{arch} has {KEPT[arch]}: its attention must keep HF's forward"


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_probe_accepts_biases_and_every_grouping(arch, kv_heads):
    module = _attention_module(arch, num_key_value_heads=kv_heads, num_attention_heads=4)
    assert _problem(module) is None


def _variant(step: str):
    """A Llama attention with one step the standard forward does not have."""
    from transformers.models.llama.modeling_llama import LlamaAttention

    class Variant(LlamaAttention):
        def forward(self, hidden_states, *args, **kwargs):
            if step == "clamp":  # visible only at large inputs (OLMo's clip_qkv is of this kind)
                hidden_states = hidden_states.clamp(-5.0, 5.0)
            if step == "rotation":
                cos, sin = kwargs["position_embeddings"]
                kwargs["position_embeddings"] = (cos, sin * 0.5)
            out, weights = super().forward(hidden_states, *args, **kwargs)
            return (out * 1.5 if step == "scaled" else out), weights

    module = _attention_module("llama")
    module.__class__ = Variant
    return module


@pytest.mark.parametrize("step", ["clamp", "rotation", "scaled"])
def test_probe_refuses_a_forward_with_one_more_step(step):
    assert "is not o_proj(attention(rotate(q), rotate(k), v))" in _problem(_variant(step))


def test_probe_runs_narrow_and_retries_at_the_real_widths_only_where_the_forward_needs_them(monkeypatch):
    """The probe's stand-ins are narrow (an 8B layer's real widths cost ~1 s of engine start); a forward that
    reads its real hidden width is probed again at it and still qualifies, a non-standard one still does not."""
    from transformers.models.llama.modeling_llama import LlamaAttention

    from vllm_transformers_backend import attention_forward

    widths = []
    probe = attention_forward._probe
    monkeypatch.setattr(attention_forward, "_probe", lambda module, sizes, head_dim, hidden, out_size, *rest:
                        widths.append((hidden, out_size)) or probe(module, sizes, head_dim, hidden, out_size, *rest))
    module = _attention_module("llama", hidden_size=96)
    real = (module.q_proj.in_features, module.o_proj.out_features)
    assert real == (96, 96)
    assert _problem(module) is None
    assert widths == [(attention_forward._PROBE_HIDDEN, attention_forward._PROBE_OUT)]

    class ReadsItsWidth(LlamaAttention):
        def forward(self, hidden_states, *args, **kwargs):
            assert hidden_states.shape[-1] == self.config.hidden_size
            return super().forward(hidden_states, *args, **kwargs)

    widths.clear()
    module.__class__ = ReadsItsWidth
    assert _problem(module) is None
    assert widths == [(attention_forward._PROBE_HIDDEN, attention_forward._PROBE_OUT), real]
    widths.clear()
    assert "is not o_proj" in _problem(_variant("scaled"))
    assert len(widths) == 2


def _record_copies(monkeypatch) -> list:
    """The modules the probe copies to the CPU from now on (``attention_forward._on_cpu`` wrapped)."""
    from vllm_transformers_backend import attention_forward

    copied = []
    on_cpu = attention_forward._on_cpu

    def recording(child):
        out = on_cpu(child)
        if out is not child:
            copied.append(child)
        return out

    monkeypatch.setattr(attention_forward, "_on_cpu", recording)
    return copied


@pytest.mark.parametrize("arch", ["qwen3", "olmo2"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_probe_names_the_query_key_norms_wherever_they_sit(arch, dtype):
    """On a GPU the probe's CPU float32 tensors meet query/key norms that sit on the device in the model's
    dtype; the verdict must still be the extra step, not a device or dtype error (another dtype stands for the
    device here: float64 norms make HF's forward fail on float32 stand-ins), and the module's own norms are left
    as they were."""
    require_architecture(arch)
    module = _attention_module(arch)
    on_cpu = _problem(module)
    assert on_cpu == "its forward is not o_proj(attention(rotate(q), rotate(k), v))"
    module.q_norm.to(dtype), module.k_norm.to(dtype)
    assert _problem(module) == on_cpu
    assert module.q_norm.weight.dtype == dtype


@pytest.mark.parametrize("arch", ["qwen3", "olmo2"])
def test_probe_runs_vllm_norms_of_a_gpu_layer_in_their_pytorch_form(arch):
    """On a GPU the ``rms_norm`` pass has made the query/key norms vLLM's, whose kernel (chosen at build) is
    the device's and does not run on the probe's CPU tensors (a kernel that raises stands for it here, the
    norms in bfloat16 as the model's dtype): the CPU copies run vLLM's PyTorch form and the verdict is the
    CPU one."""
    from vllm_transformers_backend.layers import HFRMSNorm

    def device_kernel(*args):
        raise NotImplementedError("Could not run '_C::rms_norm' with arguments from the 'CPU' backend")

    require_architecture(arch)
    module = _attention_module(arch)
    on_cpu = _problem(module)
    for name in ("q_norm", "k_norm"):
        hf = getattr(module, name)
        norm = HFRMSNorm(hf.weight.shape[0], eps=hf.variance_epsilon)
        norm.weight.data.copy_(hf.weight.data)
        norm._forward_method = device_kernel
        setattr(module, name, norm.to(torch.bfloat16))
    assert _problem(module) == on_cpu
    assert module.q_norm._forward_method is device_kernel


def test_probe_copies_small_modules_only_and_leaves_meta_ones(monkeypatch):
    """Other modules the forward never calls may sit anywhere: only small materialized ones are copied to the
    CPU (a large one, or one still on meta, stays where it is), and a standard attention still qualifies."""
    module = _attention_module("llama")
    module.unused = torch.nn.Linear(8, 8, dtype=torch.float64)
    module.large = torch.nn.Linear(1024, 1025, bias=False, device="meta")
    module.large64 = torch.nn.Linear(1024, 1025, bias=False, dtype=torch.float64)
    module.unmade = torch.nn.Linear(8, 8, device="meta")
    copied = _record_copies(monkeypatch)
    assert _problem(module) is None
    assert copied and all(child is module.unused for child in copied)


def test_probe_does_not_copy_a_meta_module_into_a_no_op():
    """An extra step whose tensors are still on meta (a bias added to the output) keeps HF's forward: the probe
    does not make up values for it (zeros would hide the step)."""
    from transformers.models.llama.modeling_llama import LlamaAttention

    class WithBias(LlamaAttention):
        def forward(self, hidden_states, *args, **kwargs):
            out, weights = super().forward(hidden_states, *args, **kwargs)
            return self.shift(out), weights

    class Shift(torch.nn.Module):
        def __init__(self, width):
            super().__init__()
            self.register_buffer("bias", torch.zeros(width, device="meta"))

        def forward(self, x):
            return x + self.bias

    module = _attention_module("llama")
    module.__class__ = WithBias
    module.shift = Shift(module.o_proj.out_features)
    assert _problem(module) is not None


def test_probe_refuses_a_scale_other_than_the_scaling_attribute():
    from transformers.models.llama.modeling_llama import LlamaAttention

    class OwnScale(LlamaAttention):
        def forward(self, hidden_states, *args, **kwargs):  # passes half its scaling attribute
            wanted, self.scaling = self.scaling, self.scaling / 2
            try:
                return super().forward(hidden_states, *args, **kwargs)
            finally:
                self.scaling = wanted

    module = _attention_module("llama")
    module.__class__ = OwnScale
    assert "softmax scale" in _problem(module)


def _attention_modules(llm):
    body = get_hf_model(llm, hf_layer_outputs=False)
    return [layer.self_attn for layer in body.layers]


@pytest.mark.parametrize("arch", sorted(LEAN | {"qwen3", "olmo2"}))
def test_engine_runs_the_lean_forward_and_generates_hf_tokens(arch, checkpoints, monkeypatch):
    """Batches mixing prompt lengths, decode steps and a prompt joining mid-decode; HF's class forward counted."""
    require_architecture(arch)
    if not interface_supported(arch):
        pytest.skip(f"{arch} has no attention interface in this transformers")
    monkeypatch.delenv(ATTENTION_ENV, raising=False)
    path = checkpoints(arch)
    expected = hf_greedy(path, PROMPTS, 10)
    with Engine(path, "transformers", max_num_seqs=3) as llm:
        modules = _attention_modules(llm)
        assert all(is_lean(m) for m in modules) == (arch in LEAN), arch
        assert any(is_lean(m) for m in modules) == (arch in LEAN), arch
        cls = type(modules[0])
        calls = []
        original = cls.forward
        monkeypatch.setattr(cls, "forward", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
        assert vllm_greedy(llm, PROMPTS, 10) == expected
        # the lean forward never falls back to HF's inside the engine (max_num_seqs=3: prompts join later)
        assert (not calls) == (arch in LEAN), f"{arch}: HF's forward ran {len(calls)} times"
        report = next(r for r in backend_model(llm).speed_passes if r.name == "attention_forward")
        assert report.replaced == (len(modules) if arch in LEAN else 0), report.line()


def test_probe_of_an_engine_layer_in_another_dtype_copies_none_of_its_projections(checkpoints, monkeypatch):
    """An engine's attention layer as the probe meets it on a GPU (here: bfloat16 on the CPU engine): its fused
    ``qkv_proj`` and ``o_proj`` are never copied (the stand-ins replace them), and it still qualifies."""
    from vllm_transformers_backend import attention_forward

    with Engine(checkpoints("llama"), "transformers") as llm:
        module = _attention_modules(llm)[0]
        assert "qkv_proj" in module._modules
        module.to(torch.bfloat16)
        copied = _record_copies(monkeypatch)
        group = attention_forward._qkv_group(module)
        problem = standard_attention_problem(module, group.sizes, module.head_dim, module.q_proj.input_size,
                                             module.o_proj.output_size, module.q_proj.has_bias, False)
    assert problem is None
    assert copied == []


def test_switched_off_and_live_access_restore_hf_forward(checkpoints, monkeypatch):
    path = checkpoints("llama")
    expected = hf_greedy(path, PROMPTS, 8)
    monkeypatch.setenv(ATTENTION_ENV, "0")
    with Engine(path, "transformers") as llm:
        assert not any(is_lean(m) for m in _attention_modules(llm))
        assert vllm_greedy(llm, PROMPTS, 8) == expected
    monkeypatch.delenv(ATTENTION_ENV)
    with Engine(path, "transformers") as llm:
        assert all(is_lean(m) for m in _attention_modules(llm))
        body = get_hf_model(llm)  # hf_layer_outputs=True: hooks on q/k/v projections must fire
        seen = []
        handle = body.layers[0].self_attn.q_proj.register_forward_hook(lambda mod, args, out: seen.append(out.shape))
        assert not any(is_lean(layer.self_attn) for layer in body.layers)
        assert vllm_greedy(llm, PROMPTS, 8) == expected
        handle.remove()
        assert seen, "q_proj's hook did not fire after live-model access"
        report = next(r for r in backend_model(llm).speed_passes if r.name == "attention_forward")
        assert report.status == "undone"


def test_without_a_rotary_table_the_first_layer_falls_back_and_tokens_stay_hf(checkpoints, monkeypatch):
    """No cos|sin table computed once (rotary_table off): the first layer of a step finds no kernel table and
    runs HF's forward, whose rotation builds the step's table; the later layers run the lean forward on it."""
    monkeypatch.delenv(ATTENTION_ENV, raising=False)
    monkeypatch.setenv("VLLM_TRANSFORMERS_BACKEND_ROTARY_TABLE", "0")
    path = checkpoints("llama")
    expected = hf_greedy(path, PROMPTS, 8)
    with Engine(path, "transformers") as llm:
        modules = _attention_modules(llm)
        assert len(modules) == 2 and all(is_lean(m) for m in modules)
        cls = type(modules[0])
        layers = []
        original = cls.forward
        monkeypatch.setattr(cls, "forward",
                            lambda self, *a, **k: layers.append(self.layer_idx) or original(self, *a, **k))
        assert vllm_greedy(llm, PROMPTS, 8) == expected
        assert layers and set(layers) == {0}, layers
