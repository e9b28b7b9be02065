"""GPU-test helpers: one vLLM engine run and torn down, the HF top-k reference, vLLM's
``check_logprobs_close`` rule, and parameter bytes of a model.

Nothing here names a device: the tests pass bf16 on CUDA; the same functions run on the CPU engine in
float32 (device="cpu") when checking this module's logic without a GPU.
"""
from __future__ import annotations

import gc
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Set, Tuple

import torch

#: One prompt's output: greedy token ids and, per generated token, {token id: logprob} of the top-k
#: (vLLM adds the sampled token when it is not among them).
Output = Tuple[List[int], List[Mapping[int, Any]]]

#: Engine arguments shared by the GPU tests: small KV cache (engines run one after another in one process,
#: so a leak cannot pile up to an OOM), few sequences (fewer CUDA graphs to capture).
ENGINE_DEFAULTS: Dict[str, Any] = dict(dtype="bfloat16", skip_tokenizer_init=True, gpu_memory_utilization=0.3,
                                       num_gpu_blocks_override=512, max_model_len=512, max_num_seqs=8, seed=0)


@dataclass
class EngineRun:
    model_class: str
    outputs: List[Output]
    parameter_bytes: int
    parameter_devices: Set[str]
    loaded_bytes: Optional[int]  # vLLM's "Loading model weights took" (device memory delta), GPU runner only
    norm_classes: Set[str]  # classes of the modules named ``*norm``
    speed_paths: Set[str]  # replacements that engaged: "residual", "act_and_mul", "rotary", "body_forward"... 
    quantization: Optional[str] = None  # the method vLLM resolved (``gptq_marlin`` for a GPTQ checkpoint, ...)
    quant_methods: Set[str] = field(default_factory=set)  # classes of the layers' quantization methods
    lora_layers: Set[str] = field(default_factory=set)  # classes of the LoRA layers vLLM's manager installed
    #: per ``forced`` sequence, the log-probability of each token after the first given the tokens before it
    forced_logprobs: List[List[float]] = field(default_factory=list)


def parameter_bytes(model: torch.nn.Module) -> Tuple[int, Set[str]]:
    """Bytes of the model's parameters (each storage counted once: tied weights are not double-counted) and
    the device types they live on (``meta`` there means a parameter was never materialised)."""
    seen, total, devices = set(), 0, set()
    for p in model.parameters():
        devices.add(p.device.type)
        key = (p.device.type, p.data_ptr()) if p.device.type != "meta" else id(p)
        if key in seen:
            continue
        seen.add(key)
        total += p.numel() * p.element_size()
    return total, devices


def speed_paths(model: torch.nn.Module) -> Set[str]:
    from vllm_transformers_backend.moe_layers import HFFusedMoE
    from vllm_transformers_backend.residual import is_fused

    modules = list(model.modules())
    paths = {"residual"} if any(is_fused(m) for m in modules) else set()
    if any(hasattr(m, "vllm_act_and_mul") for m in modules):
        paths.add("act_and_mul")
    if getattr(model, "fused_rotary", False):
        paths.add("rotary")
    moe = getattr(model, "moe", None)
    # every MoE block's experts on vLLM's kernel (not its PyTorch stand-in)
    if moe and all(isinstance(p.block.module._modules[p.block.experts_attr], HFFusedMoE)
                   and p.block.module._modules[p.block.experts_attr].uses_kernel for p in moe.plans):
        paths.add("fused_moe")
    from vllm_transformers_backend.rotary import rotary_table

    if any(rotary_table(m) is not None and rotary_table(m).kernel is not None for m in modules):
        paths.add("rotary_table")  # cos/sin and the kernel's table computed once, at the profiling run
    lean = getattr(model, "_lean_body", None)
    if lean is not None and lean.state == "on":  # the lean body gave HF's body output exactly at the profiling run
        paths.add("body_forward")
    return paths


def run_engine(path: Path | str, model_impl: str, enforce_eager: bool, prompts: Sequence[Sequence[int]],
               max_tokens: int, logprobs: int = 5, lora_requests: Optional[Sequence[Any]] = None,
               forced: Sequence[Sequence[int]] = (), **engine_kwargs: Any) -> EngineRun:
    """Starts ``vllm.LLM`` on ``path``, generates greedily with top-``logprobs`` log-probabilities (one
    ``LoRARequest`` or None per prompt with ``lora_requests``), scores the ``forced`` sequences token by token
    (vLLM's prompt log-probabilities), records the model's class, layers and weight memory, and tears the
    engine down whatever happens."""
    from vllm import LLM, SamplingParams
    from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

    args = {**ENGINE_DEFAULTS, **engine_kwargs}
    llm = LLM(model=str(path), model_impl=model_impl, enforce_eager=enforce_eager, **args)
    try:
        runner = llm.llm_engine.model_executor.driver_worker.model_runner
        model = runner.model
        nbytes, devices = parameter_bytes(model)
        params = SamplingParams(temperature=0, max_tokens=max_tokens, logprobs=logprobs, ignore_eos=True)
        extra = {} if lora_requests is None else {"lora_request": list(lora_requests)}
        outs = llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False, **extra)
        outputs = [(list(o.outputs[0].token_ids), list(o.outputs[0].logprobs)) for o in outs]
        forced_logprobs = []
        if forced:
            scored = llm.generate([{"prompt_token_ids": list(p)} for p in forced],
                                  SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0), use_tqdm=False)
            forced_logprobs = [[o.prompt_logprobs[i][t].logprob for i, t in enumerate(seq) if i > 0]
                               for o, seq in zip(scored, forced)]
        norms = {type(m).__name__ for n, m in model.named_modules() if n.endswith("norm")}
        from vllm_transformers_backend.attention import vllm_attention_of

        # The backend keeps its vLLM Attention layers beside the HF modules (not as submodules): count their
        # KV-cache quantization methods as native's Attention submodules count.
        attention = [vllm_attention_of(a) for a in getattr(model, "attention_instances", {}).values()]
        modules = list(model.modules()) + attention
        return EngineRun(type(model).__name__, outputs, nbytes, devices, getattr(runner, "model_memory_usage", None),
                         norms, speed_paths(model), llm.llm_engine.model_config.quantization,
                         {type(m.quant_method).__name__ for m in modules if getattr(m, "quant_method", None)},
                         {type(m).__name__ for m in modules if type(m).__name__.endswith(("LoRA", "Lora"))},
                         forced_logprobs)
    finally:
        del llm
        destroy_model_parallel()
        destroy_distributed_environment()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def hf_top_logprobs(path: Path | str, prompts: Sequence[Sequence[int]], max_tokens: int, dtype: torch.dtype,
                    device: str, k: int = 5, **model_kwargs: Any) -> Tuple[List[Output], int]:
    """HF ``generate`` (greedy, one prompt at a time: no padding) with each step's raw logits turned into
    top-``k`` log-probabilities; also returns the HF model's parameter bytes. ``model_kwargs`` go to
    ``from_pretrained`` (e.g. ``attn_implementation``)."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(str(path), torch_dtype=dtype,
                                                              **model_kwargs).to(device).eval()
    model.generation_config.eos_token_id = None  # like ignore_eos: every requested step runs
    outputs: List[Output] = []
    try:
        with torch.no_grad():
            for prompt in prompts:
                ids = torch.tensor([list(prompt)], device=device)
                gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                                     do_sample=False, pad_token_id=0, output_logits=True,
                                     return_dict_in_generate=True)
                tokens = gen.sequences[0, ids.shape[1]:].tolist()
                tops = []
                for step_logits in gen.logits:  # raw logits, one [1, vocab] per generated token
                    values, indices = torch.log_softmax(step_logits[0].float(), dim=-1).topk(k)
                    tops.append(dict(zip(indices.tolist(), values.tolist())))
                outputs.append((tokens, tops))
        return outputs, parameter_bytes(model)[0]
    finally:
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def hf_forced_logprobs(path: Path | str, sequences: Sequence[Sequence[int]], dtype: torch.dtype,
                       device: str) -> List[List[float]]:
    """HF's log-probability of each token of each sequence after the first, given the tokens before it (one
    forward pass per sequence: no padding)."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(str(path), torch_dtype=dtype).to(device).eval()
    try:
        with torch.no_grad():
            scores = []
            for seq in sequences:
                ids = torch.tensor([list(seq)], device=device)
                logprobs = torch.log_softmax(model(ids).logits[0, :-1].float(), dim=-1)
                scores.append(logprobs.gather(1, ids[0, 1:, None])[:, 0].tolist())
        return scores
    finally:
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def forced_gap(a: Sequence[Sequence[float]], b: Sequence[Sequence[float]]) -> Dict[str, float]:
    """Median, 90th percentile and maximum of |a - b| over every scored token of every sequence."""
    gaps = torch.tensor([abs(x - y) for sa, sb in zip(a, b, strict=True) for x, y in zip(sa, sb, strict=True)])
    return {"median": gaps.median().item(), "p90": gaps.quantile(0.9).item(), "max": gaps.max().item()}


def logprobs_departures(a: Sequence[Output], b: Sequence[Output]) -> List[str]:
    """The prompts on which ``check_logprobs_close``'s rule fails, each as the rule's message."""
    departures = []
    for i, pair in enumerate(zip(a, b)):
        try:
            check_logprobs_close([pair[0]], [pair[1]])
        except AssertionError as err:
            departures.append(f"prompt {i}: {err}")
    return departures


def check_logprobs_close(a: Sequence[Output], b: Sequence[Output], name_a: str = "a", name_b: str = "b") -> int:
    """vLLM's ``check_logprobs_close`` rule: walk each prompt's greedy tokens; at the first token where the
    two sides differ, each side's token must be in the other's top-k log-probabilities, and the sequences
    are not compared further (they diverge from there). Returns how many prompts were token-identical."""
    assert len(a) == len(b), f"{name_a} has {len(a)} outputs, {name_b} {len(b)}"
    identical = 0
    for prompt_idx, ((tokens_a, lps_a), (tokens_b, lps_b)) in enumerate(zip(a, b)):
        assert len(tokens_a) == len(tokens_b), (
            f"prompt {prompt_idx}: {name_a} made {len(tokens_a)} tokens, {name_b} {len(tokens_b)}")
        for i, (ta, tb) in enumerate(zip(tokens_a, tokens_b)):
            if ta != tb:
                assert ta in lps_b[i] and tb in lps_a[i], (
                    f"prompt {prompt_idx} step {i}: {name_a} chose {ta}, {name_b} chose {tb}; "
                    f"{name_a} top: {_fmt(lps_a[i])}; {name_b} top: {_fmt(lps_b[i])}")
                break
        else:
            identical += 1
    return identical


def _fmt(lps: Mapping[int, Any]) -> str:
    return ", ".join(f"{t}: {getattr(v, 'logprob', v):.3f}" for t, v in lps.items())


def smollm2_path() -> Tuple[Optional[Path], str]:
    """The converted SmolLM2-135M-Instruct folder for GPU runs, and where it was looked for: ``$VTB_SMOLLM2``,
    else the set-up's models cache, else ``.gpu/models/smollm2`` in the repository (a copy carried to a GPU
    host that has no models cache)."""
    from tests.helpers import MODELS_DIR

    repo = Path(__file__).resolve().parents[2]
    env = os.environ.get("VTB_SMOLLM2")
    candidates = [Path(env)] if env else [MODELS_DIR / "SmolLM2-135M-Instruct", repo / ".gpu/models/smollm2"]
    for path in candidates:
        if (path / "config.json").is_file():
            return path, ""
    return None, "looked in " + ", ".join(map(str, candidates))


def kernel_sized_checkpoint(arch: str, path: Path) -> Path:
    """A tiny random float32 Llama (GQA, untied) or Qwen2 (one KV head, tied) whose linear sizes every
    quantized and LoRA kernel takes (Marlin: n % 64, k % 128)."""
    import transformers

    common = dict(vocab_size=4096, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=1024, initializer_range=0.05)
    if arch == "llama":
        config = transformers.LlamaConfig(num_key_value_heads=2, tie_word_embeddings=False, **common)
    else:
        config = transformers.Qwen2Config(num_key_value_heads=1, tie_word_embeddings=True, **common)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(path, safe_serialization=True)
    return path
