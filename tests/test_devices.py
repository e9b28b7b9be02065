"""Device neutrality: no module of the package names the CUDA device outside the one device helper."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_only_devices_py_names_cuda():
    offenders = []
    for folder in ("vllm_transformers_backend", "patches"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path.name == "devices.py":
                continue
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if re.search(r"\bcuda\b", line):  # identifiers and strings; prose says "CUDA"
                    offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, "device-specific code belongs in vllm_transformers_backend/devices.py:\n" + "\n".join(offenders)


def test_the_check_can_fail(tmp_path):
    """The scan above would see an offending line (guards against a regex that matches nothing)."""
    assert re.search(r"\bcuda\b", 'x = torch.device("cuda")')
    assert re.search(r"\bcuda\b", "torch.cuda.synchronize()")
    assert not re.search(r"\bcuda\b", "CUDA graphs")
