"""Optimizer param groups: one per parameter *role*, decided by the parameter's global name.

    embedding      embed_in.weight (the input embedding; with tied embeddings also the output)
    output         embed_out.weight (the untied output layer)
    attention      the attention projections' weights (layers.N.attention.*)
    mlp            the MLP projections' weights (layers.N.mlp.*)
    norms_biases   every bias and every norm parameter (no weight decay, as GPT-NeoX)

Groups by role serve three purposes with one mechanism: weight decay per role (GPT-NeoX's split:
none on biases and norms; optionally none on the input embedding, as the official Sophia code),
an update rule per role (a split optimizer: Sophia on the hidden matrices, AdamW elsewhere), and
statistics per role. Under ZeRO every param group is its own flat partition, so a statistic
computed per group is a statistic per role at any layout.

The rule is by name so that code without modules (the checkpoint reader) applies the same rule
as the trainer. Checkpoints written before groups were roles have two groups, "weight_decay" and
"no_weight_decay"; GROUP_MEMBERS reads both.
"""
from __future__ import annotations

from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from torch import Tensor

ROLES = ("embedding", "output", "attention", "mlp", "norms_biases")
MATRIX_ROLES = ("embedding", "output", "attention", "mlp")
"""Roles whose parameters are all split across tensor-parallel ranks (vocab-parallel embedding,
column/row-parallel weights): a sum over all ranks counts each of their coordinates once per
data-parallel replica, so a mean over a role is the same at any layout."""


def is_no_decay(name: str) -> bool:
    """Biases and the parameters of norm modules (ours are all named *norm*)."""
    parts = name.split(".")
    return parts[-1] == "bias" or any("norm" in part for part in parts[:-1])


def role_of(name: str) -> str:
    """The role of the parameter with global ``name`` ("layers.3.mlp.dense_4h_to_h.weight")."""
    if is_no_decay(name):
        return "norms_biases"
    if name == "embed_in.weight" or name.endswith(".embed_in.weight"):
        return "embedding"
    if name == "embed_out.weight" or name.endswith(".embed_out.weight"):
        return "output"
    if ".attention." in f".{name}":
        return "attention"
    if ".mlp." in f".{name}":
        return "mlp"
    raise ValueError(f"optimizer groups: no role for parameter '{name}'; "
                     f"neox_sophia.optim.groups.role_of must learn it")


GROUP_MEMBERS: Dict[str, Callable[[str], bool]] = {
    **{role: (lambda name, role=role: role_of(name) == role) for role in ROLES},
    # the two groups of checkpoints written before groups were roles
    "weight_decay": lambda name: not is_no_decay(name),
    "no_weight_decay": is_no_decay,
}
"""Saved group name -> which global parameter names it holds (for the checkpoint reader)."""


def role_groups(named_params: Iterable[Tuple[str, Tensor]], weight_decay: float, *,
                embedding_weight_decay: bool = True,
                overrides: Optional[Dict[str, dict]] = None) -> List[dict]:
    """Param groups in ROLES order (empty ones dropped): {"params", "name": role, "weight_decay"}.

    ``overrides``: role -> extra group entries (e.g. an update rule and its hyperparameters).
    Parameters that do not require grad are left out.
    """
    by_role: Dict[str, List[Tensor]] = {role: [] for role in ROLES}
    for name, param in named_params:
        if param.requires_grad:
            by_role[role_of(name)].append(param)
    groups = []
    for role in ROLES:
        if not by_role[role]:
            continue
        decays = role != "norms_biases" and (embedding_weight_decay or role != "embedding")
        group = {"params": by_role[role], "name": role, "weight_decay": weight_decay if decays else 0.0}
        group.update((overrides or {}).get(role, {}))
        groups.append(group)
    return groups


def unknown_roles(roles: Sequence[str]) -> List[str]:
    return [r for r in roles if r not in ROLES]
