"""What every patch of vLLM shares: version guard, shape check, idempotent wrapping.

A patch names its vLLM target and the vLLM base versions it knows. On any other vLLM it refuses
(:class:`PatchError`) instead of guessing; forks compare by base version (``0.6.2+cpu`` counts as 0.6.2).

Decode step: not on it (patch machinery).
"""
from __future__ import annotations

import functools
import importlib
import inspect
from typing import Any, Callable, Iterable, Optional, Tuple

from vllm_transformers_backend import compat

_MARK = "__vllm_transformers_backend_patch__"


class PatchError(RuntimeError):
    """A patch cannot apply to the installed vLLM."""


class Patch:
    #: Short name shown by ``doctor``.
    name: str = ""
    #: Dotted path of what is patched in vLLM.
    target: str = ""
    #: vLLM base versions this patch knows.
    vllm_versions: Tuple[str, ...] = ("0.6.2",)
    #: Whether the backend cannot work without it.
    required: bool = True
    #: What the patch wraps: (owner, attribute) pairs, the owner a module (``"vllm.config"``) or a class
    #: (``"vllm.config:ModelConfig"``). The patch counts as applied when every one carries its mark.
    wraps: Tuple[Tuple[str, str], ...] = ()

    def owner(self, index: int = 0) -> Any:
        """The module or class of ``wraps[index]``."""
        return resolve(self.wraps[index][0])

    def supports_installed_vllm(self) -> bool:
        version = compat.installed_version("vllm")
        return version is not None and version.base_version in self.vllm_versions

    def check_version(self) -> None:
        if not self.supports_installed_vllm():
            raise PatchError(
                f"patch {self.name!r} ({self.target}) knows vLLM {', '.join(self.vllm_versions)} only; "
                f"vLLM {compat.vllm_version_string()} is installed. Install vllm==0.6.2 or a fork of it."
            )

    def apply(self) -> None:
        """Applies the patch; applying twice is harmless."""
        self.check_version()
        if not self.is_applied():
            self._apply()
        if not self.is_applied():
            raise PatchError(f"patch {self.name!r} ({self.target}) did not take effect")

    def is_applied(self) -> bool:
        return bool(self.wraps) and all(is_wrapped(own_attribute(resolve(owner), attr), self.name)
                                        for owner, attr in self.wraps)

    def _apply(self) -> None:
        raise NotImplementedError


class FixPatch(Patch):
    """A patch that fixes vLLM's own behaviour (for every model): neither vLLM nor the backend needs it to
    work, so a failure to apply is reported (``doctor``, the log) but does not stop the backend."""

    required = False


def resolve(path: str) -> Any:
    """``"package.module"`` or ``"package.module:Class"``: the module (imported) or the class in it."""
    module_name, _, qualname = path.partition(":")
    obj = importlib.import_module(module_name)
    for part in qualname.split(".") if qualname else ():
        obj = getattr(obj, part)
    return obj


def own_attribute(owner: Any, attr: str) -> Optional[Any]:
    """A class's own attribute (not an inherited one, which a patch of this class did not touch) or a
    module's attribute; None when absent."""
    return owner.__dict__.get(attr) if isinstance(owner, type) else getattr(owner, attr, None)


def require_parameters(func: Callable, names: Iterable[str], target: str) -> None:
    """Refuses a target whose signature is not the one the patch was written against."""
    params = inspect.signature(func).parameters
    missing = [n for n in names if n not in params]
    if missing:
        raise PatchError(f"{target} has an unexpected signature (no {', '.join(missing)}): unknown vLLM build")


def mark(func: Callable, patch_name: str) -> Callable:
    """Marks ``func`` as put in place by the patch ``patch_name`` (what :func:`is_wrapped` reads)."""
    setattr(func, _MARK, patch_name)
    return func


def is_wrapped(func: Any, patch_name: str) -> bool:
    func = func.__func__ if isinstance(func, staticmethod) else func
    func = func.fget if isinstance(func, property) else func
    return getattr(func, _MARK, None) == patch_name


def wrap(owner: Any, attr: str, patch_name: str, make: Callable[[Callable], Callable], *, static: bool = False) -> None:
    """Replaces ``owner.attr`` by ``make(original)``, marked so that a second call is a no-op."""
    raw = owner.__dict__[attr] if isinstance(owner, type) and attr in owner.__dict__ else getattr(owner, attr)
    original = raw.__func__ if isinstance(raw, staticmethod) else raw
    if getattr(original, _MARK, None) == patch_name:
        return
    wrapper = make(original)
    functools.update_wrapper(wrapper, original)
    mark(wrapper, patch_name)
    setattr(owner, attr, staticmethod(wrapper) if static else wrapper)

