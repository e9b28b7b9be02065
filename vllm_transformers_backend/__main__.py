"""``python -m vllm_transformers_backend doctor | check MODEL``: the environment (patches, settings, speed passes;
:mod:`.doctor`), or one model's chances (:mod:`.check`).

Decode step: not on it (command line).
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from .doctor import doctor


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vllm_transformers_backend")
    sub = parser.add_subparsers(dest="command", required=True)
    p_doctor = sub.add_parser("doctor", help="versions, device, patches, settings and speed passes; non-zero exit "
                                             "if not usable")
    p_doctor.add_argument("--json", action="store_true")
    p_check = sub.add_parser("check", help="can MODEL run on the backend (meta device, no weights loaded)? "
                                           "non-zero exit if not")
    p_check.add_argument("model", help="local checkpoint folder (config.json, *.safetensors)")
    p_check.add_argument("--tp", type=int, default=1, help="tensor-parallel size to check (default 1)")
    p_check.add_argument("--pp", type=int, default=1, help="pipeline-parallel size to check (default 1)")
    p_check.add_argument("--trust-remote-code", action="store_true", help="allow the model's own modeling code")
    p_check.add_argument("--json", action="store_true", help="machine-readable report")
    args = parser.parse_args(argv)
    if args.command == "doctor":
        return doctor(as_json=args.json)
    if args.command == "check":
        from .check import main as check

        return check(args.model, tp=args.tp, pp=args.pp, trust_remote_code=args.trust_remote_code, as_json=args.json)
    return 2


if __name__ == "__main__":
    sys.exit(main())
