"""LoRA on the CPU: module discovery, vLLM's LoRA manager wrapping the backend's layers, and the CPU error.

vLLM 0.6.2 runs LoRA on CUDA only (Triton "punica" kernels; its CPU executor refuses LoRA), so the engine
test is tests/gpu/test_gpu_lora.py. Here the backend model is built on the CPU, handed to vLLM's own worker
LoRA manager (``LRUCacheWorkerLoRAManager``: adapter loading from PEFT files, name checks, packing of q/k/v
into ``qkv_proj``, slot activation), and run with a reference of the punica kernels in plain PyTorch
(:class:`ReferencePunica`: each token adds ``x @ A.T @ B.T`` of its adapter's slot). Its outputs must equal
HF's model with each adapter merged into the weights (float32), for every adapter and for no adapter.
Attributes and parameter shapes must equal vLLM's native Llama/Qwen2 with the same LoRA config."""
from __future__ import annotations

import gc
from typing import Dict, List, Optional, Tuple

import pytest
import torch

from tests.helpers import PROMPTS, build_checkpoint
from tests.quantized import build_model, write_lora_adapter

LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
#: Per architecture: the adapters (targets) the test loads. Llama (untied) takes LoRA on its vocabulary
#: layers too, as vLLM's Llama does; Qwen2 here is tied, and vLLM's Qwen2 takes none there either.
ADAPTERS = {"llama": [LINEARS, LINEARS[:3] + ["down_proj", "embed_tokens", "lm_head"]],
            "qwen2": [LINEARS, ["q_proj", "v_proj", "up_proj"]]}
NATIVE = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def _lora_config(max_loras: int = 2):
    from vllm.config import LoRAConfig

    return LoRAConfig(max_lora_rank=8, max_loras=max_loras, lora_dtype=torch.float32)


@pytest.fixture(scope="module")
def lora_files(tmp_path_factory):
    """``lora_files(arch)`` -> (base checkpoint, [adapter folders]), built once."""
    root = tmp_path_factory.mktemp("lora")
    cache = {}

    def get(arch: str):
        if arch not in cache:
            base = build_checkpoint(arch, root / arch)
            adapters = [write_lora_adapter(base, root / f"{arch}-adapter{i}", targets, seed=i + 1, scale=0.1)
                        for i, targets in enumerate(ADAPTERS[arch])]
            cache[arch] = (base, adapters)
        return cache[arch]

    return get


class ReferencePunica:
    """vLLM's ``PunicaWrapper`` interface with its kernels as plain PyTorch (the CPU has no Triton kernels):
    each token (or sampled row) adds its adapter slot's ``scale * x @ A.T @ B.T``; slot -1 adds nothing."""

    def __init__(self, max_num_batched_tokens: int, max_batches: int, device: str) -> None:
        self.token_slots = torch.empty(0, dtype=torch.long)
        self.sampler_slots = torch.empty(0, dtype=torch.long)

    def update_metadata(self, mapping, lora_index_to_id, max_loras, vocab_size, extra_vocab_size,
                        long_lora_context=None) -> None:
        def slots(ids):
            return torch.tensor([lora_index_to_id.index(i) if i > 0 else -1 for i in ids], dtype=torch.long)

        self.token_slots, self.sampler_slots = slots(mapping.index_mapping), slots(mapping.prompt_mapping)
        # As vLLM's convert_mapping: rows of the added-token embeddings and of lora_a_stacked_2d per token,
        # and each sampled row's block of the LoRA logits (no adapter: the last block, all -inf).
        embedding_slots = self.token_slots.clamp(min=0)
        self._embeddings_indices = torch.stack([embedding_slots * extra_vocab_size,
                                                embedding_slots * (vocab_size + extra_vocab_size)])
        padded = self.sampler_slots.clone()
        padded[padded == -1] = max_loras - 1
        self._sampler_indices_padded = torch.arange(len(padded)) + padded * len(padded)

    @property
    def embeddings_indices(self) -> torch.Tensor:
        return self._embeddings_indices

    @property
    def sampler_indices_padded(self) -> torch.Tensor:
        return self._sampler_indices_padded

    @staticmethod
    def _add(y: torch.Tensor, x: torch.Tensor, slots: torch.Tensor, a: Optional[torch.Tensor], b: torch.Tensor,
             scale: float, offset: int = 0) -> None:
        y2, x2 = y.view(-1, y.shape[-1]), x.reshape(-1, x.shape[-1])
        for row, slot in enumerate(slots.tolist()):
            if slot < 0:
                continue
            shrunk = x2[row] if a is None else x2[row] @ a[slot, 0].T.to(x2.dtype)
            delta = scale * (shrunk @ b[slot, 0].T.to(x2.dtype))
            y2[row, offset:offset + delta.shape[-1]] += delta.to(y2.dtype)

    def add_lora(self, y, x, wa_t_all, wb_t_all, scale, y_offset=None, y_slice_size=None, *, buffer=None) -> None:
        self._add(y, x, self.token_slots, wa_t_all, wb_t_all[..., :y_slice_size or wb_t_all.shape[-2], :], scale,
                  y_offset or 0)

    def add_lora_packed_nslice(self, y, x, lora_a_stacked, lora_b_stacked, scale, output_slices) -> None:
        offset = 0
        for a, b, size in zip(lora_a_stacked, lora_b_stacked, output_slices):
            self._add(y, x, self.token_slots, a, b[..., :size, :], scale, offset)
            offset += size

    def add_expand(self, y, x, w_t_all, add_input=True) -> None:
        self._add(y, x, self.token_slots, None, w_t_all, 1.0)

    def add_lora_logits(self, y, x, wa_t_all, wb_t_all, scale, *, buffer=None) -> None:
        self._add(y, x, self.sampler_slots, wa_t_all, wb_t_all[..., :y.shape[-1], :], scale)


def _merged_hf_model(base, adapter: Optional[str]):
    """HF's model (float32) with the PEFT adapter merged into the weights: W + alpha/r * B @ A."""
    import json
    from pathlib import Path

    import transformers
    from safetensors.torch import load_file

    model = transformers.AutoModelForCausalLM.from_pretrained(base, torch_dtype=torch.float32).eval()
    if adapter is None:
        return model
    config = json.loads((Path(adapter) / "adapter_config.json").read_text())
    scaling = config["lora_alpha"] / config["r"]
    tensors = load_file(str(Path(adapter) / "adapter_model.safetensors"))
    modules = dict(model.named_modules())
    with torch.no_grad():
        for key, a in tensors.items():
            if ".lora_A." in key:
                name = key[len("base_model.model."):].replace(".lora_A.weight", "")
                modules[name].weight += scaling * tensors[key.replace("lora_A", "lora_B")] @ a
            elif key.endswith("lora_embedding_A"):
                name = key[len("base_model.model."):].rpartition(".")[0]
                modules[name].weight += scaling * (tensors[key.replace("lora_embedding_A", "lora_embedding_B")] @ a).T
    return model


def _backend_logits(model, prompt: List[int]) -> torch.Tensor:
    """The backend model's logits for every position of one prompt, outside an engine (HF's SDPA attention;
    the LoRA layers read the adapter of each token from the punica stand-in)."""
    ids = torch.tensor(prompt)
    with torch.no_grad():
        hidden = model.model(input_ids=ids[None], position_ids=torch.arange(len(prompt))[None],
                             use_cache=False, return_dict=False)[0][0]
        logits = model.logits_processor._get_logits(hidden, model.lm_head, None)
    return logits[:, :model.text_config.vocab_size]


@pytest.mark.parametrize("arch,fused", [("llama", True), ("llama", False), ("qwen2", True)],
                         ids=["llama-fused", "llama-unfused", "qwen2-fused"])
def test_adapters_through_vllms_lora_manager_equal_merged_hf(lora_files, module_process_group, monkeypatch, arch,
                                                             fused):
    import vllm.lora.models as lora_models
    from vllm.lora.layers import BaseLayerWithLoRA, LoRAMapping
    from vllm.lora.request import LoRARequest
    from vllm.lora.worker_manager import LRUCacheWorkerLoRAManager

    from vllm_transformers_backend.fusion import FUSE_ENV

    monkeypatch.setenv(FUSE_ENV, "1" if fused else "0")
    monkeypatch.setattr(lora_models, "PunicaWrapper", ReferencePunica)
    base, adapters = lora_files(arch)
    lora_config = _lora_config()
    model = build_model(base, torch.float32, lora_config=lora_config)
    vocab = model.text_config.vocab_size
    # What vLLM's model runner does at load (worker/model_runner.py), then per step: activate the requests'
    # adapters (loaded from the PEFT files) and map each token to one.
    manager = LRUCacheWorkerLoRAManager(4, 64, vocab, lora_config, torch.device("cpu"), model.embedding_modules,
                                        model.embedding_padding_modules,
                                        max_position_embeddings=model.config.max_position_embeddings)
    wrapped = manager.create_lora_manager(model)
    assert wrapped is model
    layers = {name: type(m).__name__ for name, m in model.named_modules() if isinstance(m, BaseLayerWithLoRA)}
    # At TP=1 the backend's linears are replicated (no tp_plan styles apply): vLLM's replicated LoRA layer
    # returning the tensor; fused groups get vLLM's own merged LoRA layers.
    expected_kinds = {"HFReplicatedLinearWithLoRA"} | (
        {"MergedQKVParallelLinearWithLora", "MergedColumnParallelLinearWithLoRA"} if fused else set())
    if arch == "llama":
        expected_kinds |= {"VocabParallelEmbeddingWithLoRA", "LogitsProcessorWithLoRA"}
    assert set(layers.values()) == expected_kinds, layers
    if arch == "llama":
        assert layers["logits_processor"] == "LogitsProcessorWithLoRA"
        assert layers["model.embed_tokens"] == "VocabParallelEmbeddingWithLoRA"
    requests = [LoRARequest(f"adapter{i}", i + 1, str(path)) for i, path in enumerate(adapters)]
    references = {adapter_id: _merged_hf_model(base, None if adapter_id == 0 else str(adapters[adapter_id - 1]))
                  for adapter_id in (0, 1, 2)}
    # Both adapters active in their slots each time; the prompt's tokens all use one (0: none).
    for prompt, adapter_id in zip(PROMPTS, (1, 2, 0, 2)):
        mapping = LoRAMapping(index_mapping=(adapter_id,) * len(prompt), prompt_mapping=(adapter_id,) * len(prompt),
                              is_prefill=True)
        manager.set_active_adapters(set(requests), mapping)
        got = _backend_logits(model, prompt)
        with torch.no_grad():
            expected = references[adapter_id](input_ids=torch.tensor([prompt])).logits[0]
            plain = references[0](input_ids=torch.tensor([prompt])).logits[0]
        torch.testing.assert_close(got, expected, atol=2e-4, rtol=2e-4, msg=f"adapter {adapter_id}")
        if adapter_id:  # the adapter changes the output: the comparison can fail
            assert (expected - plain).abs().max() > 1e-2


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_lora_attributes_and_weights_equal_native(lora_files, module_process_group, arch):
    base, _ = lora_files(arch)
    lora_config = _lora_config()
    backend = build_model(base, torch.float32, lora_config=lora_config)
    native = build_model(base, torch.float32, native=NATIVE[arch], lora_config=lora_config)
    assert sorted(backend.supported_lora_modules) == sorted(type(native).supported_lora_modules)
    assert backend.packed_modules_mapping == type(native).packed_modules_mapping
    assert backend.embedding_modules == type(native).embedding_modules
    assert backend.embedding_padding_modules == type(native).embedding_padding_modules
    # The vocabulary layers are sized as vLLM's (extra LoRA tokens in embedding and head for Llama): the
    # same weights in the same memory.
    ours = {n: tuple(p.shape) for n, p in backend.named_parameters()}
    assert ours == {n: tuple(p.shape) for n, p in native.named_parameters()}


def _storages(tensors) -> Dict[int, int]:
    found = {}
    for t in tensors:
        if t.device.type == "meta":
            continue
        try:
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
        except RuntimeError:  # fake / functional tensors other tests left in the process own no memory
            continue
        if storage.nbytes():
            found[ptr] = storage.nbytes()
    return found


def _tensors_alive() -> List[torch.Tensor]:
    # gc.get_objects lists cyclic garbage too until a collection frees it
    return [o for o in gc.get_objects() if issubclass(type(o), torch.Tensor)]


def _built_bytes(build) -> Tuple[int, int]:
    """(bytes of tensors that building and loading left allocated, as vLLM measures a model's memory before
    its garbage collection; bytes of the model's own parameters and buffers)."""
    gc.collect()
    before = set(_storages(_tensors_alive()))
    gc.disable()
    try:
        model = build()
        alive = _storages(_tensors_alive())
    finally:
        gc.enable()
    new = sum(n for ptr, n in alive.items() if ptr not in before)
    return new, sum(_storages([*model.parameters(), *model.buffers()]).values())


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_load_leaves_only_the_models_tensors_like_native(lora_files, module_process_group, arch):
    """vLLM's "Loading model weights took" (the GPU test compares it with native's) is the device memory
    allocated when loading ends, before vLLM's garbage collection: building and loading must leave nothing
    behind but the model's own tensors (the q/k/v and gate/up linears replaced by the fused ones once
    did, held by their loaders' reference cycles), and those equal native vLLM's weights."""
    base, _ = lora_files(arch)
    lora_config = _lora_config()
    backend_new, backend_own = _built_bytes(lambda: build_model(base, torch.float32, lora_config=lora_config))
    native_new, native_own = _built_bytes(lambda: build_model(base, torch.float32, native=NATIVE[arch],
                                                              lora_config=lora_config))
    # (on the CPU the speed passes' float32 probes leave a few small tensors; on a GPU they are not on the device)
    assert backend_new - backend_own < 4 << 10 and native_new <= native_own, (backend_new, backend_own, native_new,
                                                                              native_own)
    # the same weights as native; the buffers differ by HF's rotary inv_freq vs vLLM's cos/sin table
    assert abs(backend_own - native_own) <= 256 << 10, (backend_own, native_own)


def test_unfused_modules_are_declared_by_hf_name(lora_files, module_process_group, monkeypatch):
    from vllm_transformers_backend.fusion import FUSE_ENV

    monkeypatch.setenv(FUSE_ENV, "0")
    base, _ = lora_files("llama")
    model = build_model(base, torch.float32, lora_config=_lora_config(), load=False)
    assert sorted(model.supported_lora_modules) == sorted(LINEARS + ["embed_tokens", "lm_head"])
    assert model.packed_modules_mapping == {}


def test_lora_is_refused_for_bodies_not_named_model(module_process_group, tmp_path):
    from vllm_transformers_backend.base import BackendError

    path = build_checkpoint("gpt2", tmp_path / "gpt2")
    with pytest.raises(BackendError, match=r"LoRA: .*transformer\..*'model'"):
        build_model(path, torch.float32, lora_config=_lora_config(), load=False)


def test_cpu_engine_refuses_lora_naming_the_gpu(lora_files):
    """Refused where LLM(...) and `vllm serve` build the engine configuration, before any worker starts
    (vLLM's CPU executor would assert "cpu backend doesn't support LoRA")."""
    from vllm.engine.arg_utils import AsyncEngineArgs, EngineArgs

    base, _ = lora_files("qwen2")
    for args in (EngineArgs, AsyncEngineArgs):
        with pytest.raises(ValueError, match=r"LoRA adapters, enable_lora=True .*needs a CUDA GPU"):
            args(model=str(base), model_impl="transformers", device="cpu", skip_tokenizer_init=True,
                 enable_lora=True).create_engine_config()


def test_adapter_without_tokenizer_serves_with_the_base_tokenizer(lora_files, tmp_path):
    """A PEFT adapter without tokenizer files: vLLM 0.6.2's tokenizer group fell back to the base tokenizer
    on OSError only and raised what transformers raised here ("Unrecognized model"; sentencepiece's "Either
    model_file or model_proto must be specified" on the GPU host), so `vllm serve --lora-modules` answered
    every request for the adapter with HTTP 400; the base tokenizer serves it, as in newer vLLM. An adapter
    with its own tokenizer keeps it."""
    import asyncio
    import shutil

    from vllm.lora.request import LoRARequest
    from vllm.transformers_utils.tokenizer_group.tokenizer_group import TokenizerGroup

    from tests.quantized import write_word_tokenizer

    base, _ = lora_files("llama")
    base = shutil.copytree(base, tmp_path / "base")  # the module's base stays tokenizer-less
    write_word_tokenizer(base, 64)
    adapter = write_lora_adapter(base, tmp_path / "adapter", LINEARS, seed=3)
    group = TokenizerGroup(tokenizer_id=str(base), enable_lora=True, max_num_seqs=4, max_input_length=None)
    assert group.get_lora_tokenizer(LoRARequest("bare", 1, lora_path=str(adapter))) is group.tokenizer
    bare = LoRARequest("bare2", 2, lora_path=str(adapter))
    assert asyncio.run(group.get_lora_tokenizer_async(bare)) is group.tokenizer
    with_own = write_word_tokenizer(shutil.copytree(adapter, tmp_path / "with-own"), 80)
    own = group.get_lora_tokenizer(LoRARequest("own", 3, lora_path=str(with_own)))
    assert own is not group.tokenizer and len(own) == 80


def test_hf_lora_layers_return_the_tensor(module_process_group):
    """The LoRA layers given to the backend's own linears are vLLM's, returning what HF's modules return:
    the base output for tokens without an adapter, plus ``x @ A @ B`` for a token in an adapter's slot."""
    from vllm.lora.layers import ColumnParallelLinearWithLoRA, ReplicatedLinearWithLoRA, RowParallelLinearWithLoRA
    from vllm.lora.utils import from_layer

    from vllm_transformers_backend.layers import make_linear

    kinds: Dict[str, type] = {"colwise": ColumnParallelLinearWithLoRA, "rowwise": RowParallelLinearWithLoRA,
                              None: ReplicatedLinearWithLoRA}
    torch.manual_seed(0)
    for style, lora_cls in kinds.items():
        layer = make_linear(64, 32, True, style, None, "x")
        with torch.no_grad():
            for param in layer.parameters():
                param.normal_()
        wrapped = from_layer(layer, 2, _lora_config(), [], None)
        assert isinstance(wrapped, lora_cls) and wrapped.base_layer is layer
        lora_a, lora_b = torch.randn(64, 8), torch.randn(8, 32)
        wrapped.set_lora(1, lora_a, lora_b, None)
        punica = ReferencePunica(8, 2, "cpu")
        punica.token_slots = torch.tensor([-1, 1])
        wrapped.set_mapping(punica)
        x = torch.randn(2, 64)
        with torch.no_grad():
            out = wrapped(x)
            assert isinstance(out, torch.Tensor)
            torch.testing.assert_close(out[0], layer(x)[0])
            torch.testing.assert_close(out[1], layer(x)[1] + x[1] @ lora_a @ lora_b)
