"""The shape sweep: tiny random checkpoints drawn from fixed seeds over the dimensions that change code
paths, each run through the CPU engine and compared token for token (float32) with HF ``generate``.

Every architecture of :data:`tests.helpers.ARCHITECTURES` gets :data:`CASES_PER_ARCH` cases. Each
dimension walks through all its values over those cases (a per-architecture rotation drawn from the
seed, so the combinations differ between architectures but every value is met):

* head size among the CPU paged attention's (and 120, which vLLM lists but its CPU kernel lacks: a
  documented refusal at load); 1, 2 or 4 heads; KV heads 1, all, or half (where the config has them);
* hidden size: heads x head size, or (where the config decouples ``head_dim``) 200 or 100 (not a
  multiple of the CPU norm kernel's 8-value vectors);
* 1-3 layers, odd vocabulary sizes, tied / untied embeddings, bias switches, partial rotary fractions,
  the architecture's own switches (parallel residual, q/k norms, post-norm OPT, OPT's embedding
  projection), HF's rotation or vLLM's rotary kernel;
* prompts: one batch mixing lengths (a one-token prompt among them), then one prompt alone.

A greedy mismatch is a fault unless HF's own logits put the two tokens within :data:`TIE_TOLERANCE`
(random weights make near-ties); such ties are reported. A load error is accepted only when it is a
documented refusal (:data:`REFUSALS`, listed in the README) and only for the cases it names.
"""
from __future__ import annotations

import contextlib
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from tests import helpers

#: Head sizes the CPU paged attention is built for, and 120 (listed by vLLM 0.6.2, missing from its kernel).
HEAD_SIZES = (64, 80, 96, 112, 120, 128, 192, 256)
CASES_PER_ARCH = len(HEAD_SIZES)
MAX_TOKENS = 6
#: Largest HF logit gap between the two tokens at a greedy divergence that still counts as a tie.
TIE_TOLERANCE = 1e-4
ENGINE_ARGS = dict(max_model_len=128, num_gpu_blocks_override=128)
ROTARY_ENV = "VLLM_TRANSFORMERS_BACKEND_FUSED_ROTARY"


@dataclass
class Case:
    """One drawn configuration: config values on top of the architecture's factory, prompts, engine env."""

    arch: str
    name: str
    seed: int
    config: Dict[str, Any]
    prompts: List[List[int]]
    alone: List[int]
    env: Dict[str, str] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return f"{self.arch}-{self.name}"

    def describe(self) -> str:
        shown = {k.lstrip("_"): v for k, v in self.config.items() if k not in _SYNONYMS}
        return ", ".join(f"{k}={v}" for k, v in sorted(shown.items())) + "".join(
            f", {k}={v}" for k, v in self.env.items())


@dataclass
class Refusal:
    """A load-time error the backend raises on purpose, for the cases ``applies`` names."""

    name: str
    applies: Callable[[Case], bool]
    message: str  # regex the error must match

    def __str__(self) -> str:
        return self.name


def _config_value(case: Case, key: str, default: Any = None) -> Any:
    return case.config.get(key, default)


REFUSALS: Tuple[Refusal, ...] = (
    Refusal("no attention interface in this transformers release (upgrade transformers)",
            lambda case: not helpers.interface_supported(case.arch),
            r"does not support the Transformers attention interface"),
    Refusal("head size 120 on the CPU engine (vLLM 0.6.2's CPU paged-attention kernel lacks it)",
            lambda case: _head_size(case) == 120,
            r"head size 120 is not supported by vLLM 0\.6\.2's CPU paged attention"),
    Refusal("attention logit soft-capping on the CPU engine (FlashAttention/FlashInfer only)",
            lambda case: _config_value(case, "attn_logit_softcapping") is not None,
            r"soft-capping .*FlashAttention and FlashInfer"),
)

#: Generic config names whose value some configs keep under another name (set both: the factories pass
#: the generic ones too, and transformers applies those last).
_SYNONYMS = {"n_embd", "n_head", "n_layer", "n_inner", "ffn_dim"}


def _head_size(case: Case) -> int:
    return case.config["_head_size"]


# --- drawing cases --------------------------------------------------------------------------------

def _config_class(arch: str) -> Any:
    """The architecture's config class (None where this transformers release lacks it)."""
    try:
        return type(helpers.ARCHITECTURES[arch][0]())
    except AttributeError:
        return None


def _has(cls: Any, name: str) -> bool:
    import inspect

    return cls is not None and (name in inspect.signature(cls.__init__).parameters or hasattr(cls(), name))


def _rotation(rng: random.Random, values: Sequence[Any]) -> Callable[[int], Any]:
    """Case ``i``'s value: every value in turn, in an order and from a start the seed picks."""
    order = list(values)
    rng.shuffle(order)
    start = rng.randrange(len(order))
    return lambda i: order[(start + i) % len(order)]


#: Switches that change code paths, per model_type (name, values).
_SWITCHES: Dict[str, Tuple[Tuple[str, Tuple[Any, ...]], ...]] = {
    "gpt_neox": (("use_parallel_residual", (True, False)), ("rotary_pct", (0.25, 0.5, 1.0))),
    "opt": (("do_layer_norm_before", (True, False)), ("enable_bias", (True, False)), ("_proj", ("same", "half"))),
    "cohere": (("use_qk_norm", (False, True)),),
    "gemma2": (("attn_logit_softcapping", (None, None, None, 30.0)),),
    "mistral": (("_head_dim_none", (False, True)),),  # head_dim=None: vLLM and HF derive it
}
_BIAS_SWITCHES = ("attention_bias", "mlp_bias")
_VOCABS = (97, 509, 1000, 2053)


def draw_cases(arch: str) -> List[Case]:
    """The architecture's cases, the same on every run (seeded by the architecture's name)."""
    cls = _config_class(arch)
    rng = random.Random(f"shape-sweep:{arch}")
    decoupled = arch not in ("gpt2", "gpt_neox", "opt") and _has(cls, "head_dim")
    has_kv = _has(cls, "num_key_value_heads")
    rotations = {
        "head": _rotation(rng, HEAD_SIZES),
        "heads": _rotation(rng, (1, 2, 4)),
        "kv": _rotation(rng, ("one", "all", "half")),
        "hidden": _rotation(rng, ("heads", "heads", "200", "100") if decoupled else ("heads",)),
        "layers": _rotation(rng, (1, 2, 3)),
        "vocab": _rotation(rng, _VOCABS),
        "tie": _rotation(rng, (True, False)),
        "rotary_kernel": _rotation(rng, (False, True)),
    }
    biases = [(name, _rotation(rng, (False, True))) for name in _BIAS_SWITCHES if _has(cls, name)]
    switches = [(name, _rotation(rng, values)) for name, values in _SWITCHES.get(arch, ())]
    cases = []
    for i in range(CASES_PER_ARCH):
        head, heads = rotations["head"](i), rotations["heads"](i)
        if rotations["kv"](i) != "one" and heads == 1:
            heads = 2  # so that "all" and "half" differ from one KV head
        kv = {"one": 1, "all": heads, "half": max(1, heads // 2)}[rotations["kv"](i)]
        hidden = {"heads": heads * head, "200": 200, "100": 100}[rotations["hidden"](i)]
        config: Dict[str, Any] = dict(_head_size=head, num_attention_heads=heads, hidden_size=hidden,
                                      num_hidden_layers=rotations["layers"](i), vocab_size=rotations["vocab"](i),
                                      intermediate_size=2 * hidden + 8 * (i % 3), tie_word_embeddings=rotations["tie"](i))
        if decoupled:
            config["head_dim"] = head
        if has_kv:
            config["num_key_value_heads"] = kv
        for name, rotation in biases + switches:
            config[name] = rotation(i)
        env = {ROTARY_ENV: "all"} if rotations["rotary_kernel"](i) else {}
        cases.append(_finish(arch, f"s{i}", i, config, env, rng))
    return cases


def issue_cases(arch: str, defaults: bool = False) -> List[Case]:
    """The shapes of issue #22 (hidden 256, 4 heads of 64, GPT-NeoX's rotary_pct 0.25), two layers; with
    ``defaults`` the vocabulary and MLP width of the config's defaults as well (the reported recipe)."""
    config: Dict[str, Any] = dict(_head_size=64, hidden_size=256, num_attention_heads=4, num_hidden_layers=2,
                                  tie_word_embeddings=arch in ("gpt2", "opt"))
    if arch == "gpt_neox":
        config["rotary_pct"] = 0.25
    if arch == "opt":
        config["_proj"] = "same"
    if not defaults:
        config.update(vocab_size=1000, intermediate_size=1024)
    else:
        own = _config_class(arch)()  # the class's defaults (the factory's are the suite's tiny ones)
        config["vocab_size"] = own.vocab_size
        config["intermediate_size"] = getattr(own, "ffn_dim", None) or getattr(own, "intermediate_size", None) \
            or 4 * 256
    name = "issue-defaults" if defaults else "issue"
    return [_finish(arch, name, 1000 + defaults, config, {}, random.Random(f"shape-sweep:{arch}:{name}"))]


def _finish(arch: str, name: str, seed: int, config: Dict[str, Any], env: Dict[str, str],
            rng: random.Random) -> Case:
    """Adds the config's own names for the generic ones, and the prompts."""
    if arch == "gpt2":
        config.update(n_embd=config["hidden_size"], n_head=config["num_attention_heads"],
                      n_layer=config["num_hidden_layers"], n_inner=config.pop("intermediate_size"))
    elif arch == "opt":
        config["ffn_dim"] = config.pop("intermediate_size")
        proj = config.pop("_proj", "same")
        config["word_embed_proj_dim"] = config["hidden_size"] if proj == "same" else config["hidden_size"] // 2
    if config.pop("_head_dim_none", False) and config["hidden_size"] == config["num_attention_heads"] * config["_head_size"]:
        config["head_dim"] = None
    vocab = config["vocab_size"]
    lengths = [1, 3, 5, 7, rng.randint(8, 40)]
    rng.shuffle(lengths)
    prompts = [[rng.randrange(vocab) for _ in range(n)] for n in lengths]
    alone = [rng.randrange(vocab) for _ in range(rng.choice((1, rng.randint(2, 30))))]
    return Case(arch, name, seed, config, prompts, alone, env)


def all_cases() -> List[Case]:
    cases = []
    for arch in sorted(helpers.ARCHITECTURES):
        if arch in ("gpt2", "gpt_neox", "opt"):
            cases += issue_cases(arch) + issue_cases(arch, defaults=True)
        cases += draw_cases(arch)
    return cases


#: Run on every CI leg (under +60 s): the issue's three shapes; hidden size 100 (the CPU norm kernel's limit)
#: with head size 192, biases and the rotary kernel; head size 120 (refused); head_dim=None; OPT's
#: projection and post-norm; q/k norms with as many KV heads as heads.
CI_CASES = ("gpt2-issue", "opt-issue", "gpt_neox-issue", "llama-s0", "gpt2-s4", "mistral-s4", "opt-s3", "qwen3-s7")


# --- running a case -------------------------------------------------------------------------------

@dataclass
class Outcome:
    case: Case
    status: str  # "equal", "refused"
    detail: str = ""


#: What the sweep met in this process (printed at the end of the pytest session).
OUTCOMES: List[Outcome] = []


def build(case: Case, root: Path) -> Path:
    config = {k: v for k, v in case.config.items() if not k.startswith("_")}
    with helpers.config_overrides(**config, max_position_embeddings=256):
        return helpers.build_checkpoint(case.arch, root / case.id, seed=case.seed)


@contextlib.contextmanager
def engine_env(env: Dict[str, str]) -> Iterator[None]:
    """The case's environment for the engine it builds (the backend's rotary binding needs no undoing: it
    acts only inside the forward of the model that installed it; runtime.py)."""
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def expected_refusal(case: Case) -> Optional[Refusal]:
    return next((refusal for refusal in REFUSALS if refusal.applies(case)), None)


def run_case(case: Case, root: Path) -> Outcome:
    """Builds, runs and compares one case; raises AssertionError on any fault."""
    import pytest

    helpers.require_architecture(case.arch)
    path = build(case, root)
    refusal = expected_refusal(case)
    if refusal is not None:
        with engine_env(case.env), pytest.raises(Exception) as raised:
            with helpers.Engine(path, **ENGINE_ARGS):
                pass
        message = str(raised.value)
        assert re.search(refusal.message, message), f"{case.id}: expected the refusal '{refusal}', got: {message}"
        return _record(Outcome(case, "refused", f"{refusal} [{case.describe()}]: {_first_sentence(message)}"))
    expected = helpers.hf_greedy(path, case.prompts + [case.alone], MAX_TOKENS)
    with engine_env(case.env), helpers.Engine(path, **ENGINE_ARGS) as llm:
        got = helpers.vllm_greedy(llm, case.prompts, MAX_TOKENS)
        got += helpers.vllm_greedy(llm, [case.alone], MAX_TOKENS)
    ties = compare_greedy(path, case.prompts + [case.alone], got, expected, case.id)
    return _record(Outcome(case, "equal", "; ".join(ties)))


def _first_sentence(message: str) -> str:
    line = message.strip().splitlines()[0]
    end = line.find(". ")
    return line if end < 0 else line[:end + 1]


def _record(outcome: Outcome) -> Outcome:
    OUTCOMES.append(outcome)
    return outcome


def compare_greedy(path: Path, prompts: Sequence[Sequence[int]], got: Sequence[Sequence[int]],
                   expected: Sequence[Sequence[int]], label: str) -> List[str]:
    """Asserts the continuations are equal up to near-ties in HF's own logits; returns the ties met."""
    ties = []
    model = None
    for index, (prompt, mine, theirs) in enumerate(zip(prompts, got, expected)):
        if mine == theirs:
            continue
        step = next((i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b), min(len(mine), len(theirs)))
        assert step < min(len(mine), len(theirs)), f"{label}: prompt {index} lengths differ: {mine} vs {theirs}"
        if model is None:
            import transformers

            model = transformers.AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([list(prompt) + list(theirs[:step])])).logits[0, -1]
        gap = float(logits[theirs[step]] - logits[mine[step]])
        assert gap <= TIE_TOLERANCE, (f"{label}: prompt {index} (length {len(prompt)}) differs from HF at step {step}: "
                                      f"backend {mine}, HF {theirs}; HF logit gap {gap:.3g}")
        ties.append(f"prompt {index} tie at step {step} (gap {gap:.1e})")
    return ties


# --- the embedding path ---------------------------------------------------------------------------

ENCODER_HEAD_SIZES = (16, 32, 48, 64, 80)
POOLINGS = ("CLS", "MEAN", "LAST")


@dataclass
class EmbedCase:
    arch: str  # "bert", "roberta", "esm" (encoders) or a causal architecture of ARCHITECTURES
    name: str
    seed: int
    config: Dict[str, Any]
    pooling: str
    normalize: bool
    prompts: List[List[int]]

    @property
    def id(self) -> str:
        return f"embed-{self.arch}-{self.name}"


_ENCODERS = {"bert": "BertConfig", "roberta": "RobertaConfig", "esm": "EsmConfig"}
EMBED_DECODERS = ("llama", "qwen2", "gpt2")
EMBED_CASES_PER_ARCH = 5


def draw_embed_cases(arch: str) -> List[EmbedCase]:
    rng = random.Random(f"embed-sweep:{arch}")
    encoder = arch in _ENCODERS
    rotations = {
        "head": _rotation(rng, ENCODER_HEAD_SIZES if encoder else (64, 80, 120, 128)),
        "heads": _rotation(rng, (1, 2, 4)),
        "layers": _rotation(rng, (1, 2, 3)),
        "vocab": _rotation(rng, (33, 97, 509) if arch == "esm" else _VOCABS),
        "pooling": _rotation(rng, POOLINGS),
        "normalize": _rotation(rng, (True, False)),
    }
    cases = []
    for i in range(EMBED_CASES_PER_ARCH):
        heads, head = rotations["heads"](i), rotations["head"](i)
        config: Dict[str, Any] = dict(hidden_size=heads * head, num_attention_heads=heads,
                                      num_hidden_layers=rotations["layers"](i), intermediate_size=2 * heads * head + 8)
        vocab = 33 if arch == "esm" else rotations["vocab"](i)
        config["vocab_size"] = vocab
        if arch == "gpt2":
            config.update(n_embd=heads * head, n_head=heads, n_layer=config["num_hidden_layers"],
                          n_inner=config.pop("intermediate_size"))
        elif not encoder and _has(_config_class(arch), "num_key_value_heads"):
            config["num_key_value_heads"] = rng.choice(sorted({1, heads}))
        if not encoder and _has(_config_class(arch), "head_dim"):
            config["head_dim"] = head
        # equal lengths twice (one encoder batch), a one-token prompt, a prompt alone at its length
        lengths = [1, 4, 4, rng.randint(2, 12), rng.randint(13, 60)]
        rng.shuffle(lengths)
        # encoders' special ids (CLS, pad, EOS; ESM's <mask> 32) stay out of the bulk: a prompt of masks only
        # divides by zero in ESM's token-dropout scaling, in HF as here
        low, high = (4, 32 if arch == "esm" else vocab) if encoder else (0, vocab)
        prompts = [[rng.randrange(low, high) for _ in range(n)] for n in lengths]
        if arch == "esm":  # one <mask> in the longest prompt: ESM's token-dropout scaling
            longest = max(prompts, key=len)
            longest[len(longest) // 2] = 32
        cases.append(EmbedCase(arch, f"s{i}", i, config, rotations["pooling"](i), rotations["normalize"](i), prompts))
    return cases


def all_embed_cases() -> List[EmbedCase]:
    return [case for arch in (*_ENCODERS, *EMBED_DECODERS) for case in draw_embed_cases(arch)]


#: An encoder per release that has one through the interface, and a decoder pooling with head size 120.
CI_EMBED_CASES = ("embed-bert-s0", "embed-esm-s1", "embed-llama-s1")


def build_encoder(case: EmbedCase, root: Path) -> Path:
    import transformers

    config = dict(case.config)
    if case.arch == "roberta":
        config.update(max_position_embeddings=130, pad_token_id=1)
    elif case.arch == "esm":
        config.update(max_position_embeddings=130, position_embedding_type="rotary", pad_token_id=1,
                      mask_token_id=32, token_dropout=True)
    else:
        config.update(max_position_embeddings=128)
    cfg = getattr(transformers, _ENCODERS[case.arch])(**config)
    cfg.initializer_range = 0.1
    torch.manual_seed(case.seed)
    model_class = {"bert": "BertForMaskedLM", "roberta": "RobertaForMaskedLM", "esm": "EsmForMaskedLM"}[case.arch]
    path = root / case.id
    getattr(transformers, model_class)(cfg).eval().save_pretrained(path, safe_serialization=True)
    return path


def run_embed_case(case: EmbedCase, root: Path) -> Outcome:
    """Embeds the prompts in one call and compares with HF ``AutoModel`` + the same pooling (1e-5)."""
    import pytest

    from tests.test_embedding import hf_pooled, vllm_embed

    encoder = case.arch in _ENCODERS
    if encoder:
        path = build_encoder(case, root)
    else:
        helpers.require_architecture(case.arch)
        with helpers.config_overrides(**case.config, max_position_embeddings=256):
            path = helpers.build_checkpoint(case.arch, root / case.id, seed=case.seed)
    args = dict(runner="pooling", max_model_len=128,
                override_pooler_config={"pooling_type": case.pooling, "normalize": case.normalize})
    since = helpers.INTERFACE_SINCE.get(case.arch)
    if not helpers.interface_supported(case.arch):
        with pytest.raises(Exception, match=r"attention interface") as raised:
            with helpers.Engine(path, **args):
                pass
        return _record(Outcome(case, "refused", f"no attention interface before transformers {since}: "  # type: ignore[arg-type]
                                                f"{_first_sentence(str(raised.value))}"))
    with helpers.Engine(path, **args) as llm:
        got = vllm_embed(llm, case.prompts)
    want = hf_pooled(path, case.prompts, case.pooling, case.normalize)
    error = (got - want).abs().max().item()
    assert got.shape == want.shape and error < 1e-5, f"{case.id}: max abs difference {error:.3g} from HF"
    return _record(Outcome(case, "equal"))  # type: ignore[arg-type]
