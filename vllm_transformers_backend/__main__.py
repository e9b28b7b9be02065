"""``python -m vllm_transformers_backend doctor | check MODEL``: the environment, or one model's chances."""
from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional


def doctor(as_json: bool = False) -> int:
    from . import compat

    report = {
        "vllm": compat.vllm_version_string(),
        "vllm_supported": compat.vllm_is_supported(),
        "transformers": str(compat.installed_version("transformers")),
        "torch": str(compat.installed_version("torch")),
        "transformers_supported": False,
        "device": "unknown",
        "patches": [],
    }
    try:
        compat.check_transformers()
        report["transformers_supported"] = True
    except compat.UnsupportedVersionError as exc:
        report["transformers_error"] = str(exc)
    try:
        import vllm  # noqa: F401  (the start-up hook patches on import)
        from vllm.platforms import current_platform
        from vllm.utils import is_cpu

        report["device"] = "cpu (vLLM CPU build)" if is_cpu() else type(current_platform).__name__
        if _has_mlu():
            report["device"] += " + torch_mlu installed"
        from .patches import apply_all

        report["patches"] = [vars(s) for s in apply_all(origin="doctor")]
    except Exception as exc:  # an unimportable vLLM is a finding, not a crash
        report["vllm_error"] = f"{type(exc).__name__}: {exc}"
    ok = (report["vllm_supported"] and report["transformers_supported"] and "vllm_error" not in report
          and all(p["applied"] for p in report["patches"] if p["required"]))
    report["ok"] = ok
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        print(f"vLLM          {report['vllm']}{'' if report['vllm_supported'] else '  (UNSUPPORTED: need 0.6.2)'}")
        print(f"transformers  {report['transformers']}{'' if report['transformers_supported'] else '  (UNSUPPORTED)'}")
        print(f"torch         {report['torch']}")
        print(f"device        {report['device']}")
        for key in ("transformers_error", "vllm_error"):
            if key in report:
                print(f"error         {report[key]}")
        print("patches:")
        for p in report["patches"]:
            state = "applied" if p["applied"] else "NOT APPLIED"
            print(f"  {p['name']:<20} {state:<12} {p['target']}")
            if p["error"]:
                print(f"  {'':<20} {p['error']}")
        print("OK" if ok else "NOT OK: model_impl='transformers' will not work")
    return 0 if ok else 1


def _has_mlu() -> bool:
    from .devices import has_torch_mlu

    return has_torch_mlu()


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vllm_transformers_backend")
    sub = parser.add_subparsers(dest="command", required=True)
    p_doctor = sub.add_parser("doctor", help="versions, device and patch status; non-zero exit if not usable")
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
