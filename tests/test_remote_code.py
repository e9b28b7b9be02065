"""A ``trust_remote_code`` model with ``auto_map``, written to disk by the test."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from tests.helpers import PROMPTS, Engine, hf_greedy, vllm_greedy, vllm_model

HERE = Path(__file__).parent / "remote_code"
MAX_TOKENS = 12


def write_remote_model(path: Path, **config_kwargs) -> Path:
    """Saves TinyRemoteForCausalLM (random weights) with its code and an ``auto_map``."""
    import importlib
    import importlib.util
    import sys

    path.mkdir(parents=True, exist_ok=True)
    for name in ("configuration_tiny_remote.py", "modeling_tiny_remote.py"):
        shutil.copy(HERE / name, path / name)
    pkg = "tiny_remote_" + path.name.replace("-", "_")
    spec = importlib.util.spec_from_file_location(pkg, path / "__init__.py", submodule_search_locations=[str(path)])
    (path / "__init__.py").write_text("")
    module = importlib.util.module_from_spec(spec)
    sys.modules[pkg] = module
    spec.loader.exec_module(module)
    configuration = importlib.import_module(f"{pkg}.configuration_tiny_remote")
    modeling = importlib.import_module(f"{pkg}.modeling_tiny_remote")
    config = configuration.TinyRemoteConfig(**config_kwargs)
    config.architectures = ["TinyRemoteForCausalLM"]
    config.auto_map = {
        "AutoConfig": "configuration_tiny_remote.TinyRemoteConfig",
        "AutoModel": "modeling_tiny_remote.TinyRemoteModel",
        "AutoModelForCausalLM": "modeling_tiny_remote.TinyRemoteForCausalLM",
    }
    torch.manual_seed(0)
    model = modeling.TinyRemoteForCausalLM(config).eval()
    model.save_pretrained(path, safe_serialization=True)
    (path / "__init__.py").unlink()
    for name in ("configuration_tiny_remote.py", "modeling_tiny_remote.py"):
        shutil.copy(HERE / name, path / name)  # save_pretrained may not copy dynamic modules it did not load
    return path



@pytest.mark.parametrize("model_impl", ["transformers", "auto"])
def test_remote_code_model_generates_like_hf(tmp_path, model_impl):
    path = write_remote_model(tmp_path / f"remote-{model_impl}")
    expected = hf_greedy(path, PROMPTS, MAX_TOKENS, trust_remote_code=True, use_generate=False)
    with Engine(path, model_impl, trust_remote_code=True) as llm:
        model = vllm_model(llm)
        assert type(model).__name__ == "TransformersForCausalLM"
        assert type(model.model).__name__ == "TinyRemoteModel"
        # ScaleNorm is an RMS norm under another name: found by its numerics, not its class name.
        assert type(model.model.blocks[0].norm1).__name__ == "HFRMSNorm"
        got = vllm_greedy(llm, PROMPTS, MAX_TOKENS)
    assert got == expected


def test_attention_bypassing_the_interface_is_refused(tmp_path):
    path = write_remote_model(tmp_path / "remote-bypass", bypass_attention_interface=True)
    with pytest.raises(Exception, match="did not call the 'vllm' attention function"):
        with Engine(path, "transformers", trust_remote_code=True) as llm:
            vllm_greedy(llm, PROMPTS[:1], 2)
