"""The shape sweep (``tests/sweep.py``): drawn configurations of every architecture, token-exact with HF on
the CPU engine, and the embedding path against HF ``AutoModel`` + the same pooling.

A fixed subset runs on every leg; ``--sweep`` (or ``VTB_SWEEP=1``; ``scripts/shape_sweep.sh``) runs all
cases. Documented refusals (``sweep.REFUSALS``) must be raised at load, with their message; what the
sweep met is printed at the end of the session.
"""
from __future__ import annotations

import pytest

from tests import sweep

_CASES = sweep.all_cases()
_EMBED_CASES = sweep.all_embed_cases()


def _params(cases, ci_ids):
    known = {case.id for case in cases}
    missing = set(ci_ids) - known
    assert not missing, f"CI subset names cases the sweep does not draw: {sorted(missing)}"
    return [pytest.param(case, id=case.id, marks=() if case.id in ci_ids else pytest.mark.sweep) for case in cases]


@pytest.mark.parametrize("case", _params(_CASES, sweep.CI_CASES))
def test_generation_shapes(case, tmp_path):
    sweep.run_case(case, tmp_path)


@pytest.mark.parametrize("case", _params(_EMBED_CASES, sweep.CI_EMBED_CASES))
def test_embedding_shapes(case, tmp_path):
    sweep.run_embed_case(case, tmp_path)
