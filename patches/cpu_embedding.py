"""Patch of ``vllm.worker.cpu_worker.CPUWorker`` (vLLM 0.6.2, CPU build only): an embedding runner.

vLLM 0.6.2's CPU worker always builds ``CPUModelRunner``, which samples and never pools, and whose
prompt preparation reads block tables that embedding mode does not allocate: ``runner="pooling"`` on the
CPU engine dies in ``cpu_model_runner.py:241`` (``block_tables[seq_id]`` of None). In embedding mode the
patched worker builds :func:`cpu_embedding_runner_class` instead (prompts only, no KV cache, the model's
``pooler`` on the driver, like the GPU ``EmbeddingModelRunner``), and reports no KV cache, which
``LLMEngine`` never allocates in embedding mode. For models that take token types (cross-encoders) the
runner carries each request's types into the step's input ids, as the embedding_runner patch does on GPUs.

Known from vLLM 0.6.2+cpu; does nothing on other builds (the GPU worker has its own embedding runner).

Decode step: none (embedding mode runs prompts only); each prompt step on the CPU build runs through
the runner it adds.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Dict, List, Optional, Tuple

from vllm_transformers_backend import token_types

from ._base import require_parameters, wrap
from ._cpu import CpuBuildPatch


@functools.lru_cache(maxsize=None)
def cpu_embedding_runner_class() -> type:
    """``CPUModelRunner`` for embedding mode (built on first use: it subclasses vLLM's classes)."""
    import torch

    from vllm.model_executor.pooling_metadata import PoolingMetadata
    from vllm.multimodal import MultiModalInputs
    from vllm.worker.cpu_model_runner import CPUModelRunner, ModelInputForCPU, ModelInputForCPUBuilder

    @dataclasses.dataclass(frozen=True)
    class ModelInputForCPUWithPoolingMetadata(ModelInputForCPU):
        pooling_metadata: Optional[PoolingMetadata] = None

    class CPUEmbeddingInputBuilder(ModelInputForCPUBuilder):
        def _prepare_prompt(self, seq_group_metadata_list):
            tokens: List[int] = []
            positions: List[int] = []
            seq_lens: List[int] = []
            for seq_group_metadata in seq_group_metadata_list:
                if not seq_group_metadata.is_prompt or len(seq_group_metadata.seq_data) != 1:
                    raise ValueError("the CPU embedding runner takes single-sequence prompts only")
                if seq_group_metadata.multi_modal_data:
                    raise ValueError("the CPU embedding runner takes text prompts only")
                seq_data = next(iter(seq_group_metadata.seq_data.values()))
                prompt = seq_data.get_token_ids()
                tokens.extend(prompt)
                positions.extend(range(len(prompt)))
                seq_lens.append(len(prompt))
            device = self.device
            attn_metadata = self.attn_backend.make_metadata(
                is_prompt=True,
                seq_lens=seq_lens,
                seq_lens_tensor=torch.tensor([]),
                max_decode_seq_len=0,
                num_prefills=len(seq_lens),
                num_prefill_tokens=len(tokens),
                num_decode_tokens=0,
                block_tables=torch.tensor([]),
                # No KV cache in embedding mode: no slot is ever written.
                slot_mapping=torch.full((len(tokens),), -1, dtype=torch.long, device=device),
            )
            return (torch.tensor(tokens, dtype=torch.long, device=device),
                    torch.tensor(positions, dtype=torch.long, device=device),
                    attn_metadata, seq_lens, MultiModalInputs.batch([]))

        def _prepare_decode(self, seq_group_metadata_list):
            raise ValueError("an embedding model has no decode steps")

    class CPUEmbeddingModelRunner(CPUModelRunner):
        _model_input_cls = ModelInputForCPUWithPoolingMetadata
        _builder_cls = CPUEmbeddingInputBuilder

        def prepare_model_input(self, seq_group_metadata_list, virtual_engine: int = 0,
                                finished_requests_ids=None):
            model_input = self._prepare_model_input_tensors(seq_group_metadata_list, finished_requests_ids)
            seq_groups: List[Tuple[List[int], Any]] = []
            seq_data: Dict[int, Any] = {}
            for metadata in seq_group_metadata_list:
                seq_groups.append((list(metadata.seq_data.keys()), metadata.pooling_params))
                seq_data.update(metadata.seq_data)
            pooling = PoolingMetadata(seq_groups=seq_groups, seq_data=seq_data, prompt_lens=model_input.seq_lens)
            if getattr(self.model, "accepts_token_types", False):
                # cross-encoder segment ids ride in the ids' high bits (see vllm_transformers_backend.token_types)
                token_types.encode_into_input_ids(model_input.input_tokens, model_input.seq_lens,
                                                  [params for _, params in seq_groups])
            return dataclasses.replace(model_input, pooling_metadata=pooling, virtual_engine=virtual_engine)

        @torch.no_grad()
        def execute_model(self, model_input, kv_caches, intermediate_tensors=None, num_steps: int = 1):
            if num_steps > 1:
                raise ValueError("the CPU embedding runner does not support multi-step execution")
            num_layers = self.model_config.get_num_layers(self.parallel_config)
            hidden_states = self.model(
                input_ids=model_input.input_tokens,
                positions=model_input.input_positions,
                kv_caches=[None] * num_layers,
                attn_metadata=model_input.attn_metadata,
                **MultiModalInputs.as_kwargs(model_input.multi_modal_kwargs or {}, device=self.device),
            )
            if not self.is_driver_worker:
                return []
            return [self.model.pooler(hidden_states=hidden_states, pooling_metadata=model_input.pooling_metadata)]

    return CPUEmbeddingModelRunner


class CpuEmbeddingPatch(CpuBuildPatch):
    name = "cpu_embedding"
    target = "vllm.worker.cpu_worker.CPUWorker.__init__ (+ kv_cache): embedding runner in embedding mode"

    wraps = (("vllm.worker.cpu_worker:CPUWorker", "__init__"), ("vllm.worker.cpu_worker:CPUWorker", "kv_cache"))

    def _apply(self) -> None:
        owner = self.owner()
        require_parameters(owner.__init__, ["model_config", "parallel_config", "scheduler_config", "device_config",
                                            "cache_config", "load_config", "lora_config", "kv_cache_dtype",
                                            "prompt_adapter_config", "is_driver_worker"], self.target)
        if not isinstance(owner.__dict__.get("kv_cache"), property):
            raise RuntimeError(f"{self.target}: CPUWorker.kv_cache is not the property vLLM 0.6.2 defines")

        def make_init(original):
            def __init__(self, *args, **kwargs):
                original(self, *args, **kwargs)
                if self.model_config.embedding_mode:
                    old = self.model_runner
                    self.model_runner = cpu_embedding_runner_class()(
                        old.model_config, old.parallel_config, old.scheduler_config, old.device_config,
                        old.cache_config, load_config=old.load_config, lora_config=old.lora_config,
                        kv_cache_dtype=old.kv_cache_dtype, prompt_adapter_config=old.prompt_adapter_config,
                        is_driver_worker=old.is_driver_worker,
                    )

            return __init__

        wrap(owner, "__init__", self.name, make_init)

        original_fget = owner.__dict__["kv_cache"].fget

        def make_kv_cache(original):
            def kv_cache(self):
                # Embedding mode never allocates the cache (LLMEngine skips _initialize_kv_caches).
                if self.model_config.embedding_mode and not hasattr(self, "cpu_cache"):
                    return None
                return original(self)

            return kv_cache

        holder = type("_Holder", (), {"kv_cache": original_fget})
        wrap(holder, "kv_cache", self.name, make_kv_cache)
        owner.kv_cache = property(holder.__dict__["kv_cache"])
