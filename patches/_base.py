"""What every patch of vLLM shares: version guard, shape check, idempotent wrapping.

A patch names its vLLM target and the vLLM base versions it knows. On any other vLLM it refuses
(:class:`PatchError`) instead of guessing; forks compare by base version (``0.6.2+cpu`` counts as 0.6.2).
"""
from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, Iterable, Tuple

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
        raise NotImplementedError

    def _apply(self) -> None:
        raise NotImplementedError


def require_parameters(func: Callable, names: Iterable[str], target: str) -> None:
    """Refuses a target whose signature is not the one the patch was written against."""
    params = inspect.signature(func).parameters
    missing = [n for n in names if n not in params]
    if missing:
        raise PatchError(f"{target} has an unexpected signature (no {', '.join(missing)}): unknown vLLM build")


def is_wrapped(func: Any, patch_name: str) -> bool:
    func = func.__func__ if isinstance(func, staticmethod) else func
    return getattr(func, _MARK, None) == patch_name


def wrap(owner: Any, attr: str, patch_name: str, make: Callable[[Callable], Callable], *, static: bool = False) -> None:
    """Replaces ``owner.attr`` by ``make(original)``, marked so that a second call is a no-op."""
    raw = owner.__dict__[attr] if isinstance(owner, type) and attr in owner.__dict__ else getattr(owner, attr)
    original = raw.__func__ if isinstance(raw, staticmethod) else raw
    if getattr(original, _MARK, None) == patch_name:
        return
    wrapper = make(original)
    functools.update_wrapper(wrapper, original)
    setattr(wrapper, _MARK, patch_name)
    setattr(owner, attr, staticmethod(wrapper) if static else wrapper)

