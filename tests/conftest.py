"""Shared fixtures: tiny checkpoints built on disk, HF references and vLLM engines on the CPU."""
from __future__ import annotations

import os

# vLLM reads these at import; keep the CPU engine small and quiet in tests.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "all")

import pytest  # noqa: E402

from tests import helpers  # noqa: E402


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """``checkpoints(name)`` -> path of a tiny random checkpoint of that architecture (built once)."""
    root = tmp_path_factory.mktemp("checkpoints")
    cache = {}

    def get(name: str):
        if name not in cache:
            cache[name] = helpers.build_checkpoint(name, root / name)
        return cache[name]

    return get


@pytest.fixture(scope="session")
def smollm2_path():
    path = helpers.bundled_model("SmolLM2-135M-Instruct")
    if path is None:
        pytest.fail("the bundled SmolLM2 is missing: run scripts/setup_cpu_env.sh (it prepares the models)")
    return path


def _process_group():
    from vllm.distributed import ensure_model_parallel_initialized, init_distributed_environment
    from vllm.utils import get_open_port

    helpers.cleanup_engine()  # an engine that failed to start leaves its groups behind
    init_distributed_environment(world_size=1, rank=0, distributed_init_method=f"tcp://127.0.0.1:{get_open_port()}",
                                 local_rank=0, backend="gloo")
    ensure_model_parallel_initialized(1, 1)
    yield
    helpers.cleanup_engine()


#: vLLM's distributed state for one process (tensor and pipeline groups of size 1), for models built without
#: an engine: per test, or shared by a module's tests (each set-up costs about a second).
one_process_group = pytest.fixture(_process_group)
module_process_group = pytest.fixture(scope="module")(_process_group)


SWEEP_ENV = "VTB_SWEEP"


def pytest_addoption(parser):
    parser.addoption("--sweep", action="store_true",
                     help=f"run the whole shape sweep (tests marked 'sweep'; also {SWEEP_ENV}=1)")


def pytest_collection_modifyitems(config, items):
    """Without --sweep, the sweep's cases beyond the CI subset are deselected (and counted as such)."""
    if config.getoption("--sweep") or os.environ.get(SWEEP_ENV) == "1":
        return
    kept = [item for item in items if "sweep" not in item.keywords]
    if len(kept) != len(items):
        config.hook.pytest_deselected(items=[item for item in items if "sweep" in item.keywords])
        items[:] = kept


def pytest_terminal_summary(terminalreporter):
    """What the shape sweep met: how many cases equal HF, each refusal with its error, each near-tie."""
    from tests import sweep

    if not sweep.OUTCOMES:
        return
    write = terminalreporter.write_line
    terminalreporter.section("shape sweep")
    equal = [o for o in sweep.OUTCOMES if o.status == "equal"]
    refused = [o for o in sweep.OUTCOMES if o.status == "refused"]
    write(f"{len(equal)} case(s) equal to HF, {len(refused)} refused at load (documented refusals)")
    for outcome in refused:
        write(f"REFUSED {outcome.case.id}: {outcome.detail}")
    for outcome in equal:
        if outcome.detail:
            write(f"TIE {outcome.case.id}: {outcome.detail}")
