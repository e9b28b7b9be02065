"""Speed passes: where a built HF model's code is swapped for vLLM's faster equivalent, one protocol for all.

Decode step: these replacements are what makes the HF code run like vLLM's own
model (see README "Layout"): vLLM RMS norms (:mod:`.layers`), q/k/v and gate/up as one GEMM each and the
gated MLP's activation as one kernel (:mod:`.fusion`), the rotation through vLLM's rotary kernel and
cos/sin from a table computed once (:mod:`.rotary`), a standard attention forward as vLLM's attention
layers run it, on token rows (:mod:`.attention_forward`), the residual adds inside vLLM's fused add-and-norm
(:mod:`.residual`), then the whole body's forward as vLLM's model loop when every layer got those
(:mod:`.body_forward`); and, first, before the backend swaps HF's linears for vLLM's, mixture-of-experts blocks'
experts as one ``FusedMoE`` each (:mod:`.moe`; ``before_linears``: the experts it takes must not become
per-expert vLLM linears).

A pass (:class:`SpeedPass`) says, in this order:

1. its **switches** (:mod:`.envs` variables; all must be on) and why it cannot run for this model at
   all (``unavailable``: device, quantization, an encoder...);
2. **match**: ``sites``, the places in the model it could replace (modules, groups of sibling modules,
   functions of a modeling module), and ``key``, what a verdict holds for (the HF class, usually);
3. **validate**: ``validate``, whether the HF code at a site is the standard form the replacement
   reproduces (run once per key and per model build; checks that run HF code on made-up tensors do so
   on the CPU in float32, ``devices.cpu_probe``); anything else keeps HF's code;
4. **install**: ``install``, the replacement on the accepted sites, returning what it replaced;
5. **describe**: the runner logs one line per pass (:meth:`PassReport.line`) and the model keeps the
   reports (``model.speed_passes``), which ``doctor`` shows for a loaded model.

Verdicts live in the run (one model build), never in the process. A pass that changes something
shared by the process (the rotary pass rebinds a modeling module's function) registers it in
:mod:`.runtime`, for the model that uses it.

A new pass (MoE experts, per-layer sliding windows, quantized layers) subclasses :class:`SpeedPass`,
adds its switch to :mod:`.envs` and its instance to :func:`speed_passes`.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Dict, Hashable, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn

from . import envs
from ._logging import get_logger, preview

logger = get_logger(__name__)


@dataclass
class Build:
    """What a pass may read about the model being built (and ``owner``: the backend model itself)."""

    body: nn.Module
    device: torch.device
    tp_size: int = 1
    quant_config: Any = None
    head_size: int = 0
    num_layers: int = 0
    is_encoder: bool = False
    prefix: str = "model"
    #: The engine's position limit (``max_model_len``): how many positions a table computed once must hold.
    max_positions: int = 0
    #: The backend model being built: process-wide replacements are held for it (:mod:`.runtime`).
    owner: Any = None
    #: The dtype new vLLM layers take (None: the ambient default, which vLLM sets to the model's).
    dtype: Optional[torch.dtype] = None


@dataclass(frozen=True)
class Verdict:
    """A site's validation: ``problem`` says why HF's code stays (None: the replacement fits); ``data`` is
    what ``install`` needs (the norm's form, the fused layer...)."""

    problem: Optional[str] = None
    data: Any = None


@dataclass(frozen=True)
class Replacement:
    """What a pass replaced: ``count`` sites of ``target`` now run ``by``. ``scope``: ``"model"`` (this
    model's own modules or instance forwards) or ``"process"`` (a binding shared by the process,
    registered in :mod:`.runtime` and active only inside the models that installed it)."""

    target: str
    by: str
    count: int = 1
    scope: str = "model"


@dataclass
class PassReport:
    name: str
    status: str  # "on", "off" (a switch) or "n/a" (not applicable to this model or device)
    reason: str = ""
    sites: int = 0
    replacements: List[Replacement] = field(default_factory=list)
    #: why HF's code stayed -> at how many sites
    kept: Dict[str, int] = field(default_factory=dict)
    #: what the model needs at run time from this pass (the rotary pass: its modeling modules)
    forward_state: Any = None

    @property
    def replaced(self) -> int:
        return sum(r.count for r in self.replacements)

    def line(self) -> str:
        """The one log line of a pass."""
        if self.status != "on":
            return f"speed pass {self.name}: {self.status} ({self.reason})"
        done = "; ".join(f"{r.target} -> {r.by}" + (f" x{r.count}" if r.count > 1 else "")
                         + (" (process-wide binding)" if r.scope == "process" else "") for r in self.replacements)
        text = f"speed pass {self.name}: {self.replaced} of {self.sites} replaced" + (f": {done}" if done else "")
        if self.kept:
            text += "; HF's code kept: " + preview([f"{why} (x{n})" if n > 1 else why for why, n in self.kept.items()], 4)
        return text


def is_off(value: Any) -> bool:
    return value is False or value == "0"


class SpeedPass:
    """One kind of replacement (see the module docstring for the protocol)."""

    #: Short name: log lines, ``doctor``, ``model.speed_passes``.
    name: str = ""
    #: The :mod:`.envs` variables that must all be on.
    switches: Tuple[str, ...] = ()
    #: Runs on HF's own modules before the backend swaps linears (the backend runs it itself, first); the
    #: others run on the built model (:func:`run_speed_passes`).
    before_linears: bool = False

    @property
    def summary(self) -> str:
        """What it replaces with what (``doctor``): the class docstring's first paragraph."""
        return " ".join((type(self).__doc__ or "").split("\n\n")[0].split()).replace("``", "")

    def switched_off(self) -> Optional[str]:
        for switch in self.switches:
            if is_off(getattr(envs, switch)):
                return f"{switch}=0"
        return None

    def unavailable(self, build: Build) -> Optional[str]:
        """Why the pass cannot run for this model at all, or None."""
        return None

    def sites(self, build: Build) -> Iterable[Any]:
        raise NotImplementedError

    def key(self, site: Any) -> Optional[Hashable]:
        """What a verdict holds for (None: validate every site on its own)."""
        return None

    def validate(self, site: Any, build: Build) -> Verdict:
        raise NotImplementedError

    def install(self, accepted: Sequence[Tuple[Any, Verdict]], build: Build) -> Tuple[List[Replacement], Any]:
        """Installs the replacement on ``accepted``; returns what it replaced and the forward state."""
        raise NotImplementedError

    def run(self, build: Build) -> PassReport:
        """Switches and applicability, then match, validate (once per key) and install; logs the pass's line."""
        report = PassReport(self.name, "on")
        off = self.switched_off()
        unavailable = None if off else self.unavailable(build)
        if off or unavailable:
            report.status, report.reason = ("off", off) if off else ("n/a", unavailable)
        else:
            verdicts: Dict[Hashable, Verdict] = {}
            accepted: List[Tuple[Any, Verdict]] = []
            kept: Counter = Counter()
            for site in list(self.sites(build)):
                report.sites += 1
                key = self.key(site)
                verdict = verdicts.get(key) if key is not None else None
                if verdict is None:
                    verdict = self.validate(site, build)
                    if key is not None:
                        verdicts[key] = verdict
                if verdict.problem:
                    kept[verdict.problem] += 1
                else:
                    accepted.append((site, verdict))
            report.kept = dict(kept)
            if accepted:
                report.replacements, report.forward_state = self.install(accepted, build)
        logger.info("%s", report.line())
        return report


def speed_passes() -> Tuple[SpeedPass, ...]:
    """Every pass, in the order they run on a built model: later ones build on earlier ones (the gated
    MLP on fused projections, the residual fusion on vLLM norms)."""
    from .attention_forward import AttentionForward
    from .body_forward import BodyForward
    from .fusion import GluFusion, ProjectionFusion
    from .layers import RmsNormPass
    from .moe import FusedExperts
    from .residual import ResidualFusion
    from .rotary import RotaryKernel, RotaryTable

    return (FusedExperts(), RmsNormPass(), ProjectionFusion(), GluFusion(), RotaryKernel(), RotaryTable(),
            AttentionForward(), ResidualFusion(), BodyForward())


def run_speed_passes(build: Build) -> List[PassReport]:
    """The passes that run on the built model (those ``before_linears`` the backend has run already)."""
    return [speed_pass.run(build) for speed_pass in speed_passes() if not speed_pass.before_linears]
