"""Tiny ``...ForSequenceClassification`` checkpoints with tokenizers, and HF references for them.

Encoders (BERT, RoBERTa) and decoders (Llama, Qwen2) with random float32 weights. BERT takes the bundled
all-MiniLM-L6-v2 WordPiece tokenizer (its pairs carry token type ids), RoBERTa a byte-level BPE tokenizer
built here (RoBERTa's ``<s> A </s></s> B </s>`` pair template, no token types), the decoders the bundled
SmolLM2 tokenizer.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from tests import helpers

#: Token-id prompts (every vocabulary here has >= 261 ids): mixed lengths, two of equal length, a 1-token
#: prompt; for the decoders (pad id 7) one ends with the pad token and one has it inside.
PROMPTS: List[List[int]] = [
    [0, 45, 67, 89, 110, 2],
    [0, 33, 2],
    [0] + [40 + (i * 7) % 200 for i in range(40)] + [2],
    [0, 81, 82, 93, 100, 2],
    [5],
    [0, 120, 130, 140, 150, 160, 170, 180, 190, 200, 2],
    [0, 50, 60, 7],
    [0, 50, 7, 70, 80, 2],
]

PAIRS = [
    ("How old are you?", "I am five years old."),
    ("How old are you?", "The weather is nice today, and the sea is calm."),
    ("Where is Paris?", "Paris is the capital of France."),
    ("Where is Paris?", "Hi"),
]

_ENCODER = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2)
_DECODER = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, max_position_embeddings=512)
#: transformers class prefix per tiny model name
CLASSES = {"bert": "Bert", "roberta": "Roberta", "llama": "Llama", "qwen2": "Qwen2"}
ENCODERS = ("bert", "roberta")


def _bundled(name: str) -> Path:
    path = helpers.bundled_model(name)
    if path is None:
        import pytest

        pytest.fail(f"the bundled {name} is missing: run scripts/setup_cpu_env.sh (it prepares the models)")
    return path


def _copy_tokenizer(source: Path, target: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        if (source / name).is_file():
            shutil.copy(source / name, target / name)


def _byte_level_tokenizer(target: Path) -> int:
    """A RoBERTa-style byte-level BPE tokenizer without merges (one token per byte); returns its size."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars = [chr(b) for b in printable] + [chr(256 + n) for n in range(256 - len(printable))]
    vocab: Dict[str, int] = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "<mask>": 4}
    for char in chars:
        vocab.setdefault(char, len(vocab))
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.RobertaProcessing(sep=("</s>", 2), cls=("<s>", 0))
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", sep_token="</s>", cls_token="<s>",
        unk_token="<unk>", pad_token="<pad>", mask_token="<mask>", model_input_names=["input_ids", "attention_mask"],
    ).save_pretrained(target)
    return len(vocab)


def build(name: str, path: Path, num_labels: int = 1, problem_type: Optional[str] = None, seed: int = 0,
          id2label: Optional[Dict[int, str]] = None, body_from: Optional[Path] = None,
          with_tokenizer: bool = True) -> Path:
    """Saves a tiny (or, with ``body_from``, a real-bodied) sequence-classification checkpoint and, unless
    ``with_tokenizer`` is False (token-id prompts only), its tokenizer."""
    import transformers

    path.mkdir(parents=True, exist_ok=True)
    labels = dict(num_labels=num_labels, problem_type=problem_type,
                  **({"id2label": id2label, "label2id": {v: k for k, v in id2label.items()}} if id2label else {}))
    if body_from is not None:
        config = transformers.AutoConfig.from_pretrained(body_from, **labels)
        config.architectures = ["BertForSequenceClassification"]
        torch.manual_seed(seed)
        model = transformers.BertForSequenceClassification.from_pretrained(body_from, config=config)
        _copy_tokenizer(body_from, path)
    elif name == "bert":
        if with_tokenizer:
            _copy_tokenizer(_bundled("all-MiniLM-L6-v2"), path)
        config = transformers.BertConfig(vocab_size=30522, max_position_embeddings=128, **_ENCODER, **labels)
    elif name == "roberta":
        vocab = _byte_level_tokenizer(path)
        # positions start after padding_idx=1: 130 table rows, 128 usable
        config = transformers.RobertaConfig(vocab_size=vocab, max_position_embeddings=130, pad_token_id=1,
                                            **_ENCODER, **labels)
    else:
        if with_tokenizer:
            _copy_tokenizer(_bundled("SmolLM2-135M-Instruct"), path)
        config = getattr(transformers, f"{CLASSES[name]}Config")(vocab_size=49152, pad_token_id=7,
                                                                  tie_word_embeddings=False, **_DECODER, **labels)
    if body_from is None:
        # logits of order 1 (not 1e-3): a 1e-5 comparison means something, and float32 rounding stays below it
        config.initializer_range = 0.2 if name in ENCODERS else 0.05
        torch.manual_seed(seed)
        model = getattr(transformers, f"{CLASSES[name]}ForSequenceClassification")(config)
    model.eval().save_pretrained(path, safe_serialization=True)
    return path


def hf_model(path: Path) -> Any:
    import transformers

    return transformers.AutoModelForSequenceClassification.from_pretrained(path, torch_dtype=torch.float32).eval()


def hf_logits(path: Path, prompts: Sequence[Sequence[int]]) -> torch.Tensor:
    """HF's logits for each token-id prompt alone (no padding)."""
    model = hf_model(path)
    with torch.no_grad():
        return torch.cat([model(input_ids=torch.tensor([list(p)])).logits for p in prompts])


def hf_pair_logits(path: Path, pairs: Sequence[tuple]) -> torch.Tensor:
    """HF's logits for each (query, document) pair, tokenized together as HF users do."""
    import transformers

    import inspect

    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = hf_model(path)
    accepted = inspect.signature(model.forward).parameters
    with torch.no_grad():
        # what the model's forward takes (some tokenizers return token_type_ids that decoders do not read)
        return torch.cat([model(**{k: v for k, v in tokenizer(q, d, return_tensors="pt").items() if k in accepted}).logits
                          for q, d in pairs])


def engine_kwargs(name: str, **extra: Any) -> Dict[str, Any]:
    kwargs: Dict[str, Any] = dict(max_model_len=128) if name in ENCODERS else {}
    kwargs.update(extra)
    return kwargs
