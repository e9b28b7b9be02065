"""The import-time patches: present without any import of the package, idempotent, guarded."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest


def _run(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})


def test_model_impl_exists_after_plain_vllm_import():
    """Only `import vllm`: the start-up hook (.pth) must have patched EngineArgs, ModelConfig and the CLI."""
    code = (
        "import sys\n"
        "assert 'vllm_transformers_backend.base' not in sys.modules\n"
        "from vllm.engine.arg_utils import EngineArgs, AsyncEngineArgs\n"
        "from vllm.entrypoints.openai.cli_args import make_arg_parser\n"
        "from vllm.utils import FlexibleArgumentParser\n"
        "assert EngineArgs(model='m', model_impl='transformers').model_impl == 'transformers'\n"
        "args = make_arg_parser(FlexibleArgumentParser()).parse_args(['--model', 'm', '--model-impl', 'TRANSFORMERS'])\n"
        "assert AsyncEngineArgs.from_cli_args(args).model_impl == 'transformers'\n"
        "assert 'torch' in sys.modules\n"
        "print('OK')\n"
    )
    result = _run(code)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("OK")


def test_start_up_hook_imports_neither_torch_nor_vllm():
    result = _run("import sys; print('torch' in sys.modules, 'vllm' in sys.modules, "
                  "any(type(f).__name__ == 'VllmImportHook' for f in sys.meta_path))")
    assert result.stdout.split() == ["False", "False", "True"], result.stderr


def test_disabled_hook_leaves_vllm_untouched():
    result = _run("from vllm.engine.arg_utils import EngineArgs; EngineArgs(model='m', model_impl='transformers')",
                  VLLM_TRANSFORMERS_BACKEND_DISABLE="1", VLLM_PLUGINS="")
    assert result.returncode != 0
    assert "unexpected keyword argument 'model_impl'" in result.stderr


def test_applying_twice_is_harmless():
    from vllm.engine.arg_utils import EngineArgs

    from vllm_transformers_backend.patches import apply_all

    before = EngineArgs.__init__
    statuses = apply_all()
    apply_all()
    assert EngineArgs.__init__ is before
    assert all(s.applied for s in statuses)
    assert EngineArgs(model="m").model_impl == "auto"


def test_unknown_model_impl_is_a_clear_error():
    from vllm.engine.arg_utils import EngineArgs

    with pytest.raises(ValueError, match="Unknown model_impl 'hf'.*auto, vllm, transformers"):
        EngineArgs(model="m", model_impl="hf")


def test_cli_rejects_unknown_model_impl():
    from vllm.entrypoints.openai.cli_args import make_arg_parser
    from vllm.utils import FlexibleArgumentParser

    with pytest.raises(SystemExit):
        make_arg_parser(FlexibleArgumentParser()).parse_args(["--model", "m", "--model-impl", "hf"])


def test_patches_refuse_an_unknown_vllm(monkeypatch):
    from packaging.version import Version

    from vllm_transformers_backend import compat
    from vllm_transformers_backend.patches import PATCHES, PatchError, ensure_applied

    monkeypatch.setattr(compat, "installed_version", lambda dist: Version("0.7.3") if dist == "vllm" else None)
    with pytest.raises(PatchError, match="knows vLLM 0.6.2 only; vLLM .* is installed"):
        PATCHES[0].apply()
    with pytest.raises(PatchError, match="needs these patches"):
        ensure_applied()


def test_fork_versions_count_as_their_base(monkeypatch):
    from packaging.version import Version

    from vllm_transformers_backend import compat
    from vllm_transformers_backend.patches import PATCHES

    monkeypatch.setattr(compat, "installed_version", lambda dist: Version("0.6.2+mlu.v1.3"))
    assert all(p.supports_installed_vllm() for p in PATCHES)
    assert compat.vllm_is_supported()


def test_doctor_reports_every_patch():
    result = subprocess.run([sys.executable, "-m", "vllm_transformers_backend", "doctor"], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]
    for name in ("model_config", "engine_args", "cli", "model_architecture", "model_loader"):
        assert f"{name}" in result.stdout
    assert result.stdout.strip().endswith("OK")


def _imports_patches(source: str) -> bool:
    import ast

    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            module = ("." * node.level) + (node.module or "")
            names = [alias.name for alias in node.names]
            if module in (".patches", "vllm_transformers_backend.patches") or module.startswith(".patches.") or \
                    module.startswith("vllm_transformers_backend.patches.") or (module == "." and "patches" in names):
                return True
        elif isinstance(node, ast.Import) and any(a.name.startswith("vllm_transformers_backend.patches")
                                                  for a in node.names):
            return True
    return False


def test_only_entry_points_import_the_patches():
    """The patches depend on the backend (routing, options, config), never the other way round: only the entry
    points (start-up hook, vLLM plugin, command line, doctor) import them, so no import loop hides behind
    package_dir."""
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "vllm_transformers_backend"
    entry_points = {"_startup.py", "plugin.py", "__main__.py", "doctor.py"}
    offenders = [path.name for path in sorted(root.glob("*.py"))
                 if path.name not in entry_points and _imports_patches(path.read_text())]
    assert not offenders, f"backend modules importing the patches: {offenders}"
    # the scan sees each spelling (guards against a scan that finds nothing)
    for line in ("from .patches import ensure_applied", "from vllm_transformers_backend.patches import apply_all",
                 "import vllm_transformers_backend.patches.cli", "from . import patches"):
        assert _imports_patches(line), line


def _broken_torchaudio(root) -> str:
    """A torchaudio 2.11.0 that fails to load as one built for another torch does (an undefined symbol)."""
    package = root / "torchaudio"
    package.mkdir()
    failure = 'raise OSError("_torchaudio.abi3.so: undefined symbol: aoti_torch_abi_version")\n'
    (package / "__init__.py").write_text(failure)
    info = root / "torchaudio-2.11.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: torchaudio\nVersion: 2.11.0\n")
    return str(root)


def test_a_companion_that_does_not_load_is_named_with_the_fix(tmp_path, monkeypatch):
    """The start-up hook's message when vLLM's import dies inside torchaudio or torchvision (any transformers)."""
    import importlib

    from vllm_transformers_backend._startup import _broken_companion

    monkeypatch.syspath_prepend(_broken_torchaudio(tmp_path))
    monkeypatch.delitem(sys.modules, "torchaudio", raising=False)
    with pytest.raises(OSError) as caught:
        importlib.import_module("torchaudio")
    message = _broken_companion(caught.value)
    assert message is not None
    for part in ("torchaudio 2.11.0 does not load with torch 2.4", "undefined symbol", "uninstall torchaudio",
                 "torchaudio 2.4.0"):
        assert part in message, message
    try:
        raise OSError("some other library")
    except OSError as other:
        assert _broken_companion(other) is None


def test_vllm_import_with_a_torchaudio_for_another_torch(tmp_path):
    """transformers 5 imports torchaudio from its loss functions, so from vLLM's own import: that fails with the
    start-up hook's message naming the package and the fix. transformers 4.x does not import it there."""
    import transformers
    from packaging.version import Version

    path = os.pathsep.join([_broken_torchaudio(tmp_path), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}
    result = subprocess.run([sys.executable, "-c", "import vllm"], capture_output=True, text=True, timeout=300,
                            env=env)
    if Version(transformers.__version__).major >= 5:
        assert result.returncode != 0
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith("ImportError: vLLM could not be imported: torchaudio 2.11.0 does not load"), last
        assert "uninstall torchaudio" in last
    else:
        assert result.returncode == 0, result.stderr[-2000:]
