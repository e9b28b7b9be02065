"""What the process has replaced, as the backend reads it, without importing the patches.

The patches (``patches/``) depend on the backend, never the other way round. They record their state here
each time they are applied or checked (:func:`record_patches`; the model_loader patch checks them right
before a backend model is built), and backend code that needs an optional patch (LoRA's layer patch, the
runners that carry token types) reads it here (:func:`patch_applied`).

Decode step: not on it.
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, Optional, Tuple

#: patch name -> (applied, why not), as the patches last reported it.
_PATCHES: Dict[str, Tuple[bool, Optional[str]]] = {}


def record_patches(statuses: Iterable[Any]) -> None:
    """Called by the patches with their ``PatchStatus`` list."""
    for status in statuses:
        _PATCHES[status.name] = (bool(status.applied), status.error)


def patch_applied(name: str) -> Tuple[bool, Optional[str]]:
    """Whether the patch ``name`` is in place (as last reported), and why not."""
    return _PATCHES.get(name, (False, "the patches have not run in this process"))
