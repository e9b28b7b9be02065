"""Throughput results: the JSON file several invocations merge into, the medians per configuration, the
Markdown table for the README and the PNG chart (matplotlib optional)."""
from __future__ import annotations

import json
import os
import statistics
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from bench_specs import MODEL_LABELS

SCHEMA = 1
_IMPL_ORDER = {"vllm": 0, "transformers": 1, "hf": 2}
_MODEL_ORDER = {"tiny": 0, "1b": 1, "8b": 2, "tiny-moe": 3, "mixtral-moe": 4, "qwen2-moe": 5, "qwen3-moe": 6, "tiny-qwen3-moe": 7}
_WORKLOAD_ORDER = {"decode": 0, "prefill": 1}


def load(path: Path, fresh=None) -> Dict[str, Any]:
    """The results file at ``path``, or a new one (``fresh()``, default: the throughput benchmark's)."""
    if path.is_file():
        data = json.loads(path.read_text())
        if data.get("schema") == SCHEMA:
            return data
        raise SystemExit(f"{path} has schema {data.get('schema')}, expected {SCHEMA}: pass --fresh or another --out")
    return (fresh or empty)()


def empty() -> Dict[str, Any]:
    return {"schema": SCHEMA, "invocations": [], "checkpoints": {}, "runs": [], "failures": []}


def host_info() -> Dict[str, Any]:
    """Where an invocation ran: platform, Python, load average, git commit (and whether tracked files had
    uncommitted changes), GPUs."""
    import platform
    import subprocess

    here = str(Path(__file__).resolve().parent)
    info: Dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(),
                            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None}
    for key, cmd in (("git_commit", ["git", "-C", here, "rev-parse", "HEAD"]),
                     ("git_dirty", ["git", "-C", here, "status", "--porcelain", "--untracked-files=no"]),
                     ("gpus", ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"])):
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
            info[key] = out.stdout.strip() if out.returncode == 0 else None
        except (OSError, subprocess.SubprocessError):
            info[key] = None
    info["git_dirty"] = bool(info.get("git_dirty"))
    return info


def save(path: Path, data: Dict[str, Any]) -> None:
    """Atomic write: a run killed mid-write (the remote command limit) never leaves a truncated file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


def impl_label(impl: str, enforce_eager: Optional[bool], tp: int = 1) -> str:
    name = {"vllm": "native vLLM", "transformers": "backend", "hf": "HF generate"}[impl]
    return name + (f" TP={tp}" if tp > 1 else "") + (" (eager)" if enforce_eager else "")


def summarize(runs: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """One row per (device, model, workload, implementation, eager, TP): medians over repeats, each run's
    tok/s, the ratio to native vLLM of the same mode and TP (HF generate: to native TP=1 with CUDA graphs if
    measured), and at TP > 1 the ratio to the same implementation and mode at TP=1."""
    groups: Dict[Tuple, List[Dict[str, Any]]] = {}
    for run in runs:
        key = (run["device_name"], run["model"], run["workload"], run["impl"], run["enforce_eager"], run.get("tp", 1))
        groups.setdefault(key, []).append(run)
    rows = []
    for (device_name, model, workload, impl, eager, tp), group in groups.items():
        rows.append({"device_name": device_name, "model": model, "workload": workload, "impl": impl,
                     "enforce_eager": eager, "tp": tp, "label": impl_label(impl, eager, tp), "n": len(group),
                     "workload_text": "{workload} ({prompts} x {input_len} in / {output_len} out)".format(**group[0]),
                     "tok_s": _median(group, "tok_s"), "runs_tok_s": [r["tok_s"] for r in group],
                     "total_s": _median(group, "total_s"), "start_s": _median(group, "start_s"),
                     "weight_gib": _median(group, "weight_gib"), "loaded_gib": _median(group, "loaded_gib")})
    by_config = {(r["device_name"], r["model"], r["workload"], r["impl"], r["enforce_eager"], r["tp"]): r["tok_s"]
                 for r in rows}
    for r in rows:
        base = r["device_name"], r["model"], r["workload"]
        ref = by_config.get(base + ("vllm", r["enforce_eager"], r["tp"])) if r["impl"] != "hf" else (
            by_config.get(base + ("vllm", False, 1)) or by_config.get(base + ("vllm", True, 1)))
        r["vs_native"] = r["tok_s"] / ref if ref else None
        tp1 = by_config.get(base + (r["impl"], r["enforce_eager"], 1)) if r["tp"] > 1 else None
        r["vs_tp1"] = r["tok_s"] / tp1 if tp1 else None
    rows.sort(key=lambda r: (r["device_name"], _MODEL_ORDER.get(r["model"], 9), _WORKLOAD_ORDER.get(r["workload"], 9),
                             _mode_order(r), r["tp"], _IMPL_ORDER[r["impl"]]))
    return rows


def _mode_order(row: Dict[str, Any]) -> int:
    """CUDA-graph rows first, then eager vLLM rows, HF generate last."""
    return 2 if row["impl"] == "hf" else int(bool(row["enforce_eager"]))


def _median(group: List[Dict[str, Any]], field: str) -> Optional[float]:
    values = [r[field] for r in group if r.get(field) is not None]
    return statistics.median(values) if values else None


def markdown(rows: List[Dict[str, Any]]) -> str:
    devices = sorted({r["device_name"] for r in rows})
    lines = []
    for device in devices:
        if len(devices) > 1:
            lines += [f"**{device}**", ""]
        on_device = [r for r in rows if r["device_name"] == device]
        with_tp = any(r["tp"] > 1 for r in on_device)
        lines += ["| model | workload | implementation | output tok/s (median) | runs (tok/s) | total s | "
                  f"weights GiB{' (rank 0)' if with_tp else ''} | engine start s | vs native |"
                  + (" vs TP=1 |" if with_tp else ""),
                  "|---|---|---|---:|---|---:|---:|---:|---:|" + ("---:|" if with_tp else "")]
        for r in on_device:
            runs = ", ".join(f"{v:,.0f}" for v in r["runs_tok_s"])
            lines.append(f"| {MODEL_LABELS.get(r['model'], r['model'])} | {r['workload_text']} | {r['label']} | "
                         f"{r['tok_s']:,.0f} | {runs} | {_num(r['total_s'], 2)} | {_num(r['weight_gib'], 2)} | "
                         f"{_num(r['start_s'], 1)} | {_ratio(r['vs_native'])} |"
                         + (f" {_ratio(r['vs_tp1'])} |" if with_tp else ""))
        lines.append("")
    return "\n".join(lines)


def pairs(runs: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The backend against native vLLM (and against HF generate) within each interleaved round: runs of one
    invocation and repeat, started one after the other on the same checkpoint and prompts, so the host's drift
    between rounds cancels out of each ratio. One row per (device, model, workload, mode, TP): each round's ratio
    and their median."""
    rounds: Dict[Tuple, Dict[str, float]] = {}
    for run in runs:
        mode = None if run["impl"] == "hf" else run["enforce_eager"]
        key = (run["device_name"], run["model"], run["workload"], run.get("tp", 1), run["invocation"], run["repeat"])
        rounds.setdefault(key, {})[(run["impl"], mode)] = run["tok_s"]
    rows: Dict[Tuple, Dict[str, Any]] = {}
    for (device, model, workload, tp, _, _), tok_s in rounds.items():
        for (impl, mode), value in tok_s.items():
            if impl != "transformers":
                continue
            for other, label in (("vllm", "native vLLM"), ("hf", "HF generate")):
                ref = tok_s.get((other, mode)) if other == "vllm" else tok_s.get((other, None))
                if ref:
                    row = rows.setdefault((device, model, workload, tp, mode, other), {
                        "device_name": device, "model": model, "workload": workload, "tp": tp, "label":
                        f"{impl_label('transformers', mode, tp)} / {label}", "ratios": []})
                    row["ratios"].append(value / ref)
    out = list(rows.values())
    for row in out:
        row["median"] = statistics.median(row["ratios"])
    out.sort(key=lambda r: (r["device_name"], _MODEL_ORDER.get(r["model"], 9), _WORKLOAD_ORDER.get(r["workload"], 9),
                            r["tp"], r["label"]))
    return out


def pair_markdown(rows: List[Dict[str, Any]]) -> str:
    if not rows:
        return ""
    lines = ["| model | workload | ratio | per round | median |", "|---|---|---|---|---:|"]
    for r in rows:
        lines.append(f"| {MODEL_LABELS.get(r['model'], r['model'])} | {r['workload']} | {r['label']} | "
                     f"{', '.join(f'{v:.2f}' for v in r['ratios'])} | {r['median']:.2f}x |")
    return "\n".join(lines) + "\n"


def _num(value: Optional[float], digits: int) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def _ratio(value: Optional[float]) -> str:
    return "" if value is None else f"{value:.2f}x"


def chart(rows: List[Dict[str, Any]], path: Path, title: str) -> Optional[str]:
    """Grouped bars of median output tok/s per (model, workload), one bar per implementation, the ratio to
    native written on each bar. Returns why no chart was drawn, or None."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no PNG chart (the JSON and the table are complete)"
    device = rows[0]["device_name"] if rows else ""
    rows = [r for r in rows if r["device_name"] == device]
    groups = list(dict.fromkeys((r["model"], r["workload"]) for r in rows))
    labels = list(dict.fromkeys(r["label"] for r in rows))
    width = 0.8 / max(len(labels), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 2.2 * len(groups)), 4.5))
    for i, label in enumerate(labels):
        first = True
        for g, group in enumerate(groups):
            match = [r for r in rows if r["label"] == label and (r["model"], r["workload"]) == group]
            if not match:
                continue
            r = match[0]
            x = g + (i - (len(labels) - 1) / 2) * width
            ax.bar(x, r["tok_s"], width, color=f"C{i}", label=label if first else None)
            first = False
            if len(r["runs_tok_s"]) > 1:
                ax.vlines(x, min(r["runs_tok_s"]), max(r["runs_tok_s"]), color="black", linewidth=1)
            if r["vs_native"] is not None and r["impl"] != "vllm":
                ax.text(x, max(r["runs_tok_s"]), f"{r['vs_native']:.2f}x", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([f"{MODEL_LABELS.get(m, m)}\n{w}" for m, w in groups])
    ax.set_ylabel("output tokens/s (median; line: min-max of runs)")
    ax.set_title(f"{title}\n{device}", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None
