"""``doctor``: can this environment run the backend, and what does the backend replace at run time.

    python -m vllm_transformers_backend doctor [--json]   # versions, device, patches, settings, speed passes

    from vllm_transformers_backend.doctor import doctor
    doctor(llm)                                           # ... and every replacement the model of `llm` uses

It lists three kinds of replacement:

* the import-time patches of vLLM (``patches/``): applied or not;
* the speed passes (:mod:`.passes`) each backend model runs while it loads, with their switches; for a
  loaded model (``doctor(llm)``, through :func:`.live.backend_model`), the vLLM modules it was built with
  and what each pass replaced, from the report the model keeps (``model.speed_passes``). The same lines (``speed pass <name>: ...``) are logged at
  INFO while a model loads, in every worker: the way to see them for a model in another process (tensor
  or pipeline parallel workers, ``vllm serve``);
* the process-wide bindings now in place in this process (:mod:`.runtime`), with the models using them.

Decode step: not on it (a diagnostic).
"""
from __future__ import annotations

import json
from typing import Any, Dict


def _setting(envs: Any, name: str) -> Any:
    """A setting's value, or what is wrong with it (a value a choice setting does not know: the model load
    refuses it with the same message)."""
    try:
        return getattr(envs, name)
    except ValueError as exc:
        return f"INVALID: {exc}"


def report(llm: Any = None) -> Dict[str, Any]:
    """The doctor report as a dict (``llm``: also the replacements of the model it runs)."""
    from . import compat, envs

    result: Dict[str, Any] = {
        "vllm": compat.vllm_version_string(),
        "vllm_supported": compat.vllm_is_supported(),
        "transformers": str(compat.installed_version("transformers")),
        "torch": str(compat.installed_version("torch")),
        "transformers_supported": False,
        "device": "unknown",
        "patches": [],
        "settings": {name: {"value": _setting(envs, name), "set": envs.is_set(name)}
                     for name in envs.environment_variables},
        "speed_passes": [],
        "process_replacements": [],
    }
    try:
        compat.check_transformers()
        result["transformers_supported"] = True
    except compat.UnsupportedVersionError as exc:
        result["transformers_error"] = str(exc)
    try:
        import vllm  # noqa: F401  (the start-up hook patches on import)
        from vllm.platforms import current_platform
        from vllm.utils import is_cpu

        from .devices import has_torch_mlu

        result["device"] = "cpu (vLLM CPU build)" if is_cpu() else type(current_platform).__name__
        if has_torch_mlu():
            result["device"] += " + torch_mlu installed"
        from .patches import apply_all

        result["patches"] = [vars(s) for s in apply_all(origin="doctor")]
        from .passes import speed_passes

        result["speed_passes"] = [{"name": p.name, "switches": list(p.switches), "summary": p.summary}
                                  for p in speed_passes()]
        from .runtime import process_replacements

        result["process_replacements"] = process_replacements()
    except Exception as exc:  # an unimportable vLLM is a finding, not a crash
        result["vllm_error"] = f"{type(exc).__name__}: {exc}"
    if llm is not None:
        from .live import backend_model
        from .runtime import model_modules, model_replacements

        from .quantization import method_name

        model = backend_model(llm)
        result["model"] = {"class": type(model).__name__, "body": type(model.model).__name__,
                           "quantization": method_name(model.quant_config),
                           "lora": model.lora_config is not None,
                           "modules": model_modules(model), "speed_passes": model_replacements(model),
                           "log": [r.line() for r in model.speed_passes]}
    result["ok"] = bool(result["vllm_supported"] and result["transformers_supported"] and "vllm_error" not in result
                        and all(p["applied"] for p in result["patches"] if p["required"]))
    return result


def format_report(result: Dict[str, Any]) -> str:
    lines = [f"vLLM          {result['vllm']}{'' if result['vllm_supported'] else '  (UNSUPPORTED: need 0.6.2)'}",
             f"transformers  {result['transformers']}{'' if result['transformers_supported'] else '  (UNSUPPORTED)'}",
             f"torch         {result['torch']}",
             f"device        {result['device']}"]
    for key in ("transformers_error", "vllm_error"):
        if key in result:
            lines.append(f"error         {result[key]}")
    lines.append("patches (import time, vLLM):")
    for p in result["patches"]:
        lines.append(f"  {p['name']:<22} {'applied' if p['applied'] else 'NOT APPLIED':<12} {p['target']}")
        if p["error"]:
            lines.append(f"  {'':<22} {p['error']}")
    lines.append("settings:")
    for name, setting in result["settings"].items():
        lines.append(f"  {name:<40} {setting['value']!s:<6} {'(set)' if setting['set'] else '(default)'}")
    lines.append("speed passes (run by each backend model while it loads; logged as 'speed pass <name>: ...'):")
    for p in result["speed_passes"]:
        lines.append(f"  {p['name']:<12} {p['summary']}")
        lines.append(f"  {'':<12} switches: {', '.join(p['switches'])}")
    lines.append("process-wide replacements in place in this process:")
    for r in result["process_replacements"]:
        lines.append(f"  {r['target']} ({r['by']}; used by {r['used_by']})")
    if not result["process_replacements"]:
        lines.append("  none (no backend model built in this process; doctor(llm) lists a loaded model's)")
    if "model" in result:
        model = result["model"]
        lines.append(f"model {model['class']} ({model['body']}): its run-time replacements")
        lines.append(f"  quantization: {model['quantization'] or 'none'}; LoRA adapters: "
                     f"{'enabled' if model['lora'] else 'off'}")
        lines.append("  vLLM modules: " + ", ".join(f"{name} x{n}" for name, n in model["modules"].items()))
        lines.extend(f"  {line}" for line in model["log"])
    lines.append("OK" if result["ok"] else "NOT OK: model_impl='transformers' will not work")
    return "\n".join(lines)


def doctor(llm: Any = None, as_json: bool = False) -> int:
    """Prints the report (``llm``: with the replacements of the model it runs); 0 when the backend can work."""
    result = report(llm)
    print(json.dumps(result, indent=2, default=str) if as_json else format_report(result))
    return 0 if result["ok"] else 1
