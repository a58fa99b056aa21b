"""What a memory plan says: per phase and rank 0, bytes by kind, the peak and where, headroom, batch limits.

:class:`MemoryPlan` is plain data (picklable, :meth:`MemoryPlan.to_dict` for JSON);
:meth:`MemoryPlan.table` prints it (:mod:`phasetune.plan.table`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from phasetune.plan.setup import PlanSetup

SIMULATED = "simulated"
ANALYTIC = "analytic"


@dataclass
class HostMemory:
    """Host RAM of rank 0 in one phase (bytes): CPU offload, restore-best snapshot (this rank's trainable shards,
    their optimizer state and the buffers; none in the final phase), prefix cache (what the phase's cache holds in
    RAM: ``limit_mb``, or ``dataset_size`` samples of ``prefix_cache_per_sample`` bytes when that is less)."""

    offload: int = 0
    snapshot: int = 0
    prefix_cache: int = 0
    prefix_cache_per_sample: int = 0

    @property
    def total(self) -> int:
        """Host bytes held at once at most: a snapshot is briefly held twice while a better one replaces it."""
        return self.offload + 2 * self.snapshot + self.prefix_cache


@dataclass
class PhaseMemory:
    """Rank 0's device memory in one phase (bytes unless said otherwise).

    ``params``/``grads``/``optimizer``: model states resident on the device (sharded, or whole);
    ``accumulated_grads``: gradients kept between the micro-steps of an accumulation cycle (FSDP2 keeps them
    unsharded, in the reduce dtype, while gradient sync is off); the rest is
    at the moment of the forward/backward peak: ``params_unsharded`` (gathered units), ``activations``
    (saved activations, backward temporaries and the batch), ``collectives`` (all-gather and reduce-scatter
    buffers; DDP's gradient buckets). ``peak`` is the larger of the forward/backward peak (optimizer state
    included) and the optimizer step's (``step_peak``); ``peak_at`` names the module running then.
    ``headroom`` is the budget (``device_gib`` less the margin) minus the peak; ``max_micro_batch`` the
    largest micro-batch whose peak fits (None without ``device_gib``); ``per_sample`` the extra bytes of one
    more sample. ``source`` is ``"simulated"`` or ``"analytic"`` (model states only: the model did not run).
    """

    phase: int
    trainable: int
    trainable_fraction: float
    lowest_trainable_block: str | None
    params: int
    grads: int
    optimizer: int
    step_temporaries: int
    accumulated_grads: int = 0
    params_unsharded: int = 0
    activations: int = 0
    collectives: int = 0
    forward_backward_peak: int = 0
    step_peak: int = 0
    peak: int = 0
    peak_at: str = ""
    headroom: int | None = None
    max_micro_batch: int | None = None
    per_sample: int | None = None
    host: HostMemory = field(default_factory=HostMemory)
    ranks: list[dict[str, int]] = field(default_factory=list)
    breakdown: dict[str, int] = field(default_factory=dict)
    source: str = SIMULATED
    act_ckpt_peak: int | None = None

    @property
    def fits(self) -> bool | None:
        return None if self.headroom is None else self.headroom >= 0


@dataclass
class MemoryPlan:
    """Per-phase memory of a scheduled run (see :class:`PhaseMemory`), with advice and notes."""

    setup: PlanSetup
    model: str
    n_params: int
    phases: list[PhaseMemory]
    budget: int | None
    advice: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    units: list[str] = field(default_factory=list)
    seconds: float = 0.0
    schedule: str = ""  # the schedule planned: its path, "a dict", or "the generated default"

    @property
    def fits(self) -> bool | None:
        """Whether every phase fits the device (None without ``device_gib``)."""
        if self.budget is None:
            return None
        return all(p.fits for p in self.phases)

    def failing(self) -> list[PhaseMemory]:
        """The phases whose peak exceeds the budget."""
        return [p for p in self.phases if p.fits is False]

    def problems(self) -> list[str]:
        """One line per phase that will not fit (by how much, and what the plan measured would help): what a
        front end raises before phase 0 instead of failing hours later."""
        failing = {f"phase {p.phase} will not fit" for p in self.failing()}
        return [a for a in self.advice if any(a.startswith(f) for f in failing)]

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON: the setup, every phase's numbers (bytes), advice and notes."""
        setup = asdict(self.setup)
        setup["fsdp_plan"] = _plain(setup["fsdp_plan"])
        setup["fsdp_default_kwargs"] = _plain(setup["fsdp_default_kwargs"])
        return {
            "model": self.model,
            "schedule": self.schedule,
            "n_params": self.n_params,
            "setup": setup,
            "budget": self.budget,
            "fits": self.fits,
            "phases": [asdict(p) for p in self.phases],
            "advice": list(self.advice),
            "problems": self.problems(),
            "notes": list(self.notes),
            "units": list(self.units),
            "seconds": round(self.seconds, 2),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MemoryPlan:
        """The plan :meth:`to_dict` gave (read back from JSON): a recorded plan prints the same table again."""
        setup = dict(data["setup"])
        if setup.get("block_classes") is not None:
            setup["block_classes"] = tuple(setup["block_classes"])
        phases = [PhaseMemory(**{**p, "host": HostMemory(**p["host"])}) for p in data["phases"]]
        return cls(PlanSetup(**setup), data["model"], data["n_params"], phases, data["budget"], list(data["advice"]),
                   list(data["notes"]), list(data["units"]), data["seconds"], data.get("schedule", ""))

    def table(self, unit: str | None = None, timing: bool = True) -> str:
        """The plan as a text table (GiB, or MiB for small models; ``unit`` forces one). ``timing=False`` leaves
        out how long planning took, the one line that differs between two plans of the same run."""
        from phasetune.plan.table import format_plan

        return format_plan(self, unit, timing)

    def __str__(self) -> str:
        return self.table()


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if obj is None or isinstance(obj, (int, float, str, bool)):
        return obj
    return repr(obj)


__all__ = ["ANALYTIC", "SIMULATED", "HostMemory", "MemoryPlan", "PhaseMemory"]
