"""``python -m vllm_transformers_backend check``: the report says whether a model can run, and why not.

The CLI runs in a subprocess twice (table and ``--json``, exit codes); the other cases call the same
code in-process (``check.main``), which is what the CLI calls.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vllm_transformers_backend import check

ROOT = Path(__file__).resolve().parent.parent


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "VLLM_LOGGING_LEVEL": "WARNING"}
    return subprocess.run([sys.executable, "-m", "vllm_transformers_backend", "check", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def _run(capsys, path: Path, **kwargs) -> tuple:
    """(exit code, parsed --json report) of ``check`` in this process."""
    code = check.main(str(path), as_json=True, **kwargs)
    return code, json.loads(capsys.readouterr().out)


def _finding(report: dict, name: str) -> dict:
    found = [f for f in report["findings"] if f["check"] == name]
    assert found, f"no {name!r} finding in {[f['check'] for f in report['findings']]}"
    return found[0]


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _rewrite_tensors(path: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    file = path / "model.safetensors"
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def test_tiny_llama_passes_at_tp2(checkpoints):
    path = checkpoints("llama")
    proc = _cli(str(path), "--tp", "2")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "RESULT: can run" in proc.stdout
    for row in ("attention interface  OK", "tensor parallel      OK", "checkpoint keys      OK"):
        assert row in proc.stdout, proc.stdout
    # 2 heads over 2 ranks; the single KV head is replicated
    assert "per rank: 1 of 2 attention heads, 1 KV head (only 1 KV for TP=2: replicated)" in proc.stdout


def test_json_output_parses(checkpoints):
    path = checkpoints("llama")
    proc = _cli(str(path), "--tp", "2", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)  # stdout is the report alone, library logs go to stderr
    assert report["can_run"] is True and report["kind"] == "decoder" and report["tp"] == 2
    assert report["hf_class"] == "LlamaForCausalLM" and report["body_class"] == "LlamaModel"
    [attention] = report["attention_modules"]
    assert attention["class"] == "LlamaAttention" and attention["called_vllm"] == [0, 1]
    styles = {linear["name"]: linear["style"] for linear in report["linears"]}
    assert styles["layers.0.self_attn.q_proj"] == "colwise" and styles["layers.1.mlp.down_proj"] == "rowwise"
    assert len(styles) == 14  # 7 linears per layer, the LM head is not the body's
    assert report["checkpoint"]["format"] == "safetensors" and report["checkpoint"]["unmapped"] == []


def test_unknown_checkpoint_tensor_is_reported(checkpoints, tmp_path, capsys):
    path = _copy(checkpoints("llama"), tmp_path / "extra")
    _rewrite_tensors(path, lambda t: t.update({"model.layers.0.mlp.surprise.weight": torch.zeros(4, 4)}))
    code, report = _run(capsys, path)
    assert code == 1 and report["can_run"] is False
    assert report["checkpoint"]["unmapped"] == ["model.layers.0.mlp.surprise.weight"]
    assert _finding(report, "checkpoint keys")["status"] == "error"


def test_missing_and_misshapen_tensors_are_reported(checkpoints, tmp_path, capsys):
    path = _copy(checkpoints("llama"), tmp_path / "broken")

    def edit(tensors):
        del tensors["model.norm.weight"]
        tensors["model.layers.1.mlp.up_proj.weight"] = torch.zeros(3, 128)

    _rewrite_tensors(path, edit)
    code, report = _run(capsys, path)
    assert code == 1
    assert report["checkpoint"]["missing"] == ["model.norm.weight"]
    assert report["checkpoint"]["shape_mismatch"] == [
        "model.layers.1.mlp.up_proj.weight [3, 128] -> model.layers.1.mlp.up_proj.weight [256, 128]"]


def test_bin_checkpoint_keys_are_not_listed(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from tests.helpers import ARCHITECTURES

    config = ARCHITECTURES["llama"][0]()
    config.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(0)
    config.save_pretrained(tmp_path)
    # written by hand: transformers 5 no longer saves pickled checkpoints
    torch.save(AutoModelForCausalLM.from_config(config).state_dict(), tmp_path / "pytorch_model.bin")
    code, report = _run(capsys, tmp_path)
    assert code == 0
    keys = _finding(report, "checkpoint keys")
    assert keys["status"] == "warn" and "cannot be listed without loading" in keys["detail"]


def test_model_without_tp_plan_at_tp2_names_the_fix(tmp_path, capsys):
    from tests.test_remote_code import write_remote_model

    path = write_remote_model(tmp_path / "remote")
    code, report = _run(capsys, path, trust_remote_code=True)
    assert code == 0, report  # fine on one rank
    code, report = _run(capsys, path, tp=2, trust_remote_code=True)
    assert code == 1
    tp = _finding(report, "tensor parallel")
    assert tp["status"] == "error"
    assert "TinyRemoteModel has no tp_plan" in tp["detail"] and "base_model_tp_plan" in tp["detail"]
    assert "--tp 1" in tp["detail"]


def test_model_bypassing_the_interface_is_caught_on_meta(tmp_path, capsys):
    """The meta forward sees which layers call the "vllm" attention function (the backend's own check
    runs on the first forward of a loaded engine)."""
    from tests.test_remote_code import write_remote_model

    path = write_remote_model(tmp_path / "bypass", bypass_attention_interface=True)
    code, report = _run(capsys, path, trust_remote_code=True)
    assert code == 1
    attention = _finding(report, "attention interface")
    assert attention["status"] == "error" and "layers 0, 1 did not call the 'vllm' attention function" in attention["detail"]
    assert report["attention_modules"][0]["class"] == "Mixer" and report["attention_modules"][0]["called_vllm"] == []


def test_remote_code_needs_the_flag(tmp_path, capsys):
    from tests.test_remote_code import write_remote_model

    path = write_remote_model(tmp_path / "remote")
    code, report = _run(capsys, path)
    assert code == 1
    assert "--trust-remote-code" in _finding(report, "config")["detail"]


def test_pipeline_parallel_without_support_or_plan_fails(tmp_path, capsys):
    from tests.test_remote_code import write_remote_model

    path = write_remote_model(tmp_path / "remote")
    code, report = _run(capsys, path, pp=2, trust_remote_code=True)
    assert code == 1 and _finding(report, "pipeline parallel")["status"] == "error"


def test_bert_is_detected_as_an_encoder(tmp_path, capsys):
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                        num_attention_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(tmp_path)
    _, report = _run(capsys, tmp_path)
    assert report["kind"] == "encoder" and report["runner"] == "pooling"
    assert _finding(report, "model kind")["detail"].startswith("encoder (")
    assert report["hf_class"] == "BertModel"  # encoders are built as AutoModel (no LM head)
    # the checkpoint maps (HF's pooler is skipped by the pooling model, not reported as unmapped)
    assert report["checkpoint"]["unmapped"] == [] and report["checkpoint"]["missing"] == []
    assert check.main(str(tmp_path)) in (0, 1)  # the table, too
    assert "kind          encoder -> pooling runner" in capsys.readouterr().out


def test_decoder_is_not_an_encoder(checkpoints, capsys):
    """The counterpart of the BERT test: a causal model is a decoder (guards a detector that says
    "encoder" for everything)."""
    _, report = _run(capsys, checkpoints("gpt_neox"))
    assert report["kind"] == "decoder" and report["runner"] == "generate"


@pytest.mark.parametrize("method,status", [("awq", "ok"), ("qqq", "warn"), ("gguf", "error"), ("hqq", "error")])
def test_quantization_methods(checkpoints, tmp_path, capsys, method, status):
    path = _copy(checkpoints("llama"), tmp_path / method)
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": method, "bits": 4}
    (path / "config.json").write_text(json.dumps(config))
    code, report = _run(capsys, path)
    quant = _finding(report, "quantization")
    assert quant["status"] == status and quant["detail"].startswith(method)
    assert code == (1 if status == "error" else 0)


def test_safetensors_header_reads_no_tensor_data(tmp_path):
    from safetensors.torch import save_file

    file = tmp_path / "t.safetensors"
    save_file({"a": torch.zeros(1000, 1000), "b": torch.ones(2, 3)}, file)
    data = file.read_bytes()
    length = int.from_bytes(data[:8], "little")
    file.write_bytes(data[:8 + length])  # tensor data cut off: only the header is left to read
    header = check.safetensors_header(file)
    assert {k: v["shape"] for k, v in header.items()} == {"a": [1000, 1000], "b": [2, 3]}
