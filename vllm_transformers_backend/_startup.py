"""Start-up hook: patch vLLM the moment it is imported, in every process.

``vllm_transformers_backend.pth`` (installed into site-packages) imports this module when Python
starts. It must stay cheap: it imports neither torch nor vLLM. It puts a finder on ``sys.meta_path``
that, when ``vllm`` is imported, lets the import finish and then applies the patches, so that
``EngineArgs(model_impl=...)`` and ``--model-impl`` exist before any user code or CLI parser sees them.
That also covers processes vLLM spawns (``vllm serve``'s engine, multiprocessing and Ray workers).

Set ``VLLM_TRANSFORMERS_BACKEND_DISABLE=1`` to leave vLLM untouched.

Decode step: not on it (runs once per process, at start-up).
"""
from __future__ import annotations

import importlib.abc
import sys


def _apply_patches(origin: str) -> None:
    from vllm_transformers_backend.patches import apply_all

    apply_all(origin=origin)


#: torch's companion packages that transformers imports whenever they are installed (transformers 5 imports
#: torchaudio from its loss functions, so from vLLM's own import); one built for another torch fails to load.
_COMPANIONS = ("torchaudio", "torchvision")


def _broken_companion(exc: BaseException) -> str | None:
    """What to say when vLLM's import failed inside torchaudio or torchvision (None: it did not)."""
    import traceback
    from importlib import metadata

    files = [frame.filename.replace("\\", "/") for frame in traceback.extract_tb(exc.__traceback__)]
    name = next((name for name in _COMPANIONS if any(f"/{name}/" in file for file in files)), None)
    if name is None:
        return None

    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "unknown"

    torch_version = version("torch")
    return (f"vLLM could not be imported: {name} {version(name)} does not load with torch {torch_version} "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). transformers "
            f"{version('transformers')} imports {name} whenever it is installed. Install the {name} built for "
            f"torch {torch_version.split('+')[0]} (vLLM 0.6.2 pins torch 2.4.0: torchaudio 2.4.0, torchvision "
            f"0.19.0) or uninstall {name}.")


class _PatchAfterExec(importlib.abc.Loader):
    """Delegates to vLLM's own loader, then patches the freshly executed package."""

    def __init__(self, inner: importlib.abc.Loader) -> None:
        self._inner = inner

    def create_module(self, spec):
        return self._inner.create_module(spec)

    def exec_module(self, module) -> None:
        try:
            self._inner.exec_module(module)
        except (ImportError, OSError, RuntimeError) as exc:
            broken = _broken_companion(exc)
            if broken is None:
                raise
            raise ImportError(broken) from exc
        _apply_patches("import hook")

    def __getattr__(self, name):
        return getattr(self._inner, name)


class VllmImportHook(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname != "vllm":
            return None
        sys.meta_path[:] = [f for f in sys.meta_path if f is not self]  # one vLLM import per process
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            spec = find(fullname, path, target) if find else None
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _PatchAfterExec(spec.loader)
        return spec


def install() -> None:
    from vllm_transformers_backend import envs

    if envs.VLLM_TRANSFORMERS_BACKEND_DISABLE:
        return
    if "vllm" in sys.modules:
        _apply_patches("late start-up hook")
        return
    if not any(isinstance(f, VllmImportHook) for f in sys.meta_path):
        sys.meta_path.insert(0, VllmImportHook())


install()
