"""The performance section: switches that change speed, never what is trained (neox-sophia keys)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class PerformanceConfig:
    compile_model: Optional[bool] = None
    """(neox-sophia) Compile each transformer layer with torch.compile (neox_sophia.model.compile):
    true, false, or null for the device's default (neox_sophia.model.compile.COMPILE_BY_DEFAULT: on
    only where it was measured faster; so far nowhere). The loss equals the eager model's within
    float rounding; the first steps pay the compile (cached on disk after).
    The optimizer's fused kernels are chosen by optimizer.params.fused. Not a GPT-NeoX key."""

    def validate(self) -> None:
        pass
