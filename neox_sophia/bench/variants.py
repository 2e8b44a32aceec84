"""Named Sophia variants for the convergence benchmark (`--variant NAME`): each a description and
the `--set` overrides it applies on top of the Sophia block the benchmark builds (the paper's
Sophia-G settings), so a variant is tuned on the same lr x rho grid, with the same edge rule, as
"paper". The AdamW baseline is never changed by a variant.

An override may name "{adamw_lr}": the best AdamW lr of the same corpus (the "split" variant runs
AdamW with it on the groups Sophia leaves out), so such a variant is tuned after AdamW's grid.
Keys that the optimizer does not know yet fail at config load, in one line naming the key.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

ADAMW_LR = "{adamw_lr}"


@dataclass(frozen=True)
class Variant:
    name: str
    description: str
    overrides: Tuple[str, ...] = ()

    @property
    def needs_adamw(self) -> bool:
        return any(ADAMW_LR in o for o in self.overrides)

    def resolved(self, adamw_lr: Optional[float] = None) -> List[str]:
        """The overrides with {adamw_lr} filled in (the best AdamW lr of the same corpus)."""
        if self.needs_adamw and adamw_lr is None:
            raise ValueError(f"variant {self.name}: needs the best AdamW lr")
        return [o.replace(ADAMW_LR, f"{adamw_lr:.6e}") if ADAMW_LR in o else o for o in self.overrides]

    def record(self, adamw_lr: Optional[float] = None) -> dict:
        return {"name": self.name, "description": self.description, "overrides": self.resolved(adamw_lr)}


VARIANTS: Dict[str, Variant] = {v.name: v for v in [
    Variant("paper", "Sophia-G with the paper's settings (b1 0.965, b2 0.99, k 10, no bias correction, "
                     "every group, weight decay on embeddings as GPT-NeoX)"),
    Variant("bias_correction", "Hessian EMA divided by (1 - b2^n) after n refreshes (beyond the paper)",
            ("optimizer.params.hessian_bias_correction=true",)),
    Variant("hessian_floor", "h floored at 0.1 x its parameter group's mean h, so that coordinates never "
                             "refreshed (h == 0) step by |m| / (rho bs floor) instead of lr sign(m) "
                             "(beyond the paper)",
            ("optimizer.params.hessian_floor=0.1",)),
    Variant("split", "Sophia on the hidden matrices (attention, MLP); AdamW (betas 0.9/0.95, the best AdamW "
                     "lr of the corpus) on the embedding, the output layer, norms and biases (beyond the paper)",
            ("optimizer.params.adamw_groups=[embedding, output, norms_biases]",
             f"optimizer.params.adamw_lr={ADAMW_LR}", "optimizer.params.adamw_betas=[0.9, 0.95]")),
    Variant("beta1_0.9", "b1 0.9 (a 10-step momentum memory) instead of 0.965 (28 steps)",
            ("optimizer.params.betas=[0.9, 0.99]",)),
    Variant("no_embedding_decay", "no weight decay on the input embedding (as the official GPT-2 Sophia "
                                  "code; GPT-NeoX decays it)",
            ("embedding_weight_decay=false",)),
    Variant("sophia_h", "Sophia-H: Hutchinson's u * (H u) estimator instead of Gauss-Newton-Bartlett",
            ("optimizer.params.estimator=hutchinson",)),
]}


def parse_variants(values: Sequence[str]) -> List[Variant]:
    """--variant values (repeatable, each a comma list) -> variants in the order given, once each.
    ValueError naming the unknown name and the known ones."""
    names: List[str] = []
    for value in values:
        names += [n.strip() for n in value.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise ValueError(f"--variant: unknown {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    return [VARIANTS[n] for n in dict.fromkeys(names or ["paper"])]
