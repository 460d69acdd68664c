"""The samplers a request can choose, as a table from the public name to the diffusers scheduler that
implements it. Every request builds a fresh scheduler from the pristine config captured at setup, so
one request's choice (Karras sigmas, say) can never leak into the next."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin


@dataclass(frozen=True)
class SchedulerSpec:
    cls: type[SchedulerMixin]
    overrides: dict[str, Any] = field(default_factory=dict)
    # The name AUTOMATIC1111 shows for this sampler, written into the image metadata.
    a1111_name: str = ""


_KARRAS_2M = {"use_karras_sigmas": True, "algorithm_type": "dpmsolver++", "solver_order": 2}

SCHEDULERS: dict[str, SchedulerSpec] = {
    "DDIM": SchedulerSpec(DDIMScheduler, a1111_name="DDIM"),
    "DPMSolverMultistep": SchedulerSpec(DPMSolverMultistepScheduler, a1111_name="DPM++ 2M"),
    "HeunDiscrete": SchedulerSpec(HeunDiscreteScheduler, a1111_name="Heun"),
    # stability-ai/sdxl's name for DPM++ 2M with Karras sigmas; kept as an alias so its users can migrate.
    "KarrasDPM": SchedulerSpec(DPMSolverMultistepScheduler, _KARRAS_2M, a1111_name="DPM++ 2M Karras"),
    "K_EULER_ANCESTRAL": SchedulerSpec(EulerAncestralDiscreteScheduler, a1111_name="Euler a"),
    "K_EULER": SchedulerSpec(EulerDiscreteScheduler, a1111_name="Euler"),
    # PLMS proper: the Runge-Kutta warm-up steps need dozens of steps and break below ~10 (as in SD 1.x's config).
    "PNDM": SchedulerSpec(PNDMScheduler, {"skip_prk_steps": True}, a1111_name="PLMS"),
    "DPM++ 2M Karras": SchedulerSpec(DPMSolverMultistepScheduler, _KARRAS_2M, a1111_name="DPM++ 2M Karras"),
    "UniPC": SchedulerSpec(UniPCMultistepScheduler, a1111_name="UniPC"),
}


def make_scheduler(name: str, pristine_config: dict[str, Any]) -> SchedulerMixin:
    """A new scheduler of the named kind, configured from the model's own scheduler config."""
    spec = SCHEDULERS[name]
    return spec.cls.from_config(pristine_config, **spec.overrides)
