"""Keys that published GPT-NeoX configs use under another name than current NeoX does.

Each is read as the key it stands for and reported in one line (``notes``). Two kinds:

- a renamed key (RENAMED): the same value under NeoX's current name. It is renamed as the file
  is read, so that the two spellings count as one key (both set: a duplicate key, as usual).
- a derived key (DERIVED): a value current NeoX expresses through another key, converted once
  every file and override is merged, because the conversion reads other keys (lr, train_iters).

Where each one comes from (EleutherAI/gpt-neox history; EleutherAI/pythia `models/`):

    gas            NeoX's second name for gradient_accumulation_steps (removed Feb 2024, #1144);
                   every Pythia file of EleutherAI/pythia models/ sets it
    save_interval  NeoX's name for checkpoint_factor before Dec 2022 (configs/autotuning_configs)
    decay_lr_to    the llemma branch's cosine floor as a fraction of lr (configs/llemma/7B.yml):
                   its cosine lr * (d + (1-d)(1+cos)/2) is NeoX's with min_lr = d * lr
    warmup_iters   the llemma branch's warmup in steps (configs/llemma/7B.yml): NeoX's warmup is
                   a fraction of the decay steps, warmup = warmup_iters / lr_decay_iters
    attention_type "groupedquery" in configs/llemma/34B.yml: current NeoX derives grouped-query
                   attention from num_kv_heads alone
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

from neox_sophia.config.base import ConfigError, _number

# old name -> (current name, where NeoX used the old one)
RENAMED: Dict[str, Tuple[str, str]] = {
    "gas": ("gradient_accumulation_steps", "NeoX's second name for it until Feb 2024, set by the Pythia configs"),
    "save_interval": ("checkpoint_factor", "NeoX's name for it before Dec 2022"),
}


def rename(key: str) -> Tuple[str, Optional[str]]:
    """(the key NeoX uses now, a note when it was renamed) for a normalized top-level key."""
    if key not in RENAMED:
        return key, None
    target, why = RENAMED[key]
    return target, f"{key}: read as {target} ({why})"


@dataclass(frozen=True)
class Derived:
    """A key whose value current NeoX spells with ``targets``; ``convert`` returns their values
    (and raises ConfigError naming the key when it cannot)."""

    targets: Tuple[str, ...]
    convert: Callable[[Any, Dict[str, Any]], Dict[str, Any]]
    why: str


def _lr(values: Dict[str, Any]) -> float:
    params = (values.get("optimizer") or {}).get("params") or {}
    lr = _number(params.get("lr", 1.0e-3))  # NeoX's default optimizer is Adam at lr 1e-3
    if lr is None:
        raise ConfigError("optimizer: params.lr is not a number", "optimizer")
    return float(lr)


def _decay_lr_to(value: Any, values: Dict[str, Any]) -> Dict[str, Any]:
    ratio = _number(value)
    if ratio is None or not 0 <= ratio <= 1:
        raise ConfigError(f"decay_lr_to: expected a fraction of lr in [0, 1], got {value!r}", "decay_lr_to")
    if values.get("lr_decay_style", "linear") != "cosine":
        raise ConfigError("decay_lr_to: only defined for lr_decay_style cosine (the llemma branch asserted it); "
                          "set min_lr instead", "decay_lr_to")
    return {"min_lr": float(ratio) * _lr(values)}


def _decay_steps(values: Dict[str, Any]) -> int:
    """The LR schedule's decay length the way TrainingConfig.decay_iters computes it."""
    train, decay, fraction = (_number(values.get(k)) for k in ("train_iters", "lr_decay_iters", "lr_decay_fraction"))
    if decay is not None:
        return max(1, int(decay))
    if train is None:
        raise ConfigError("warmup_iters: needs train_iters or lr_decay_iters to become NeoX's warmup fraction",
                          "warmup_iters")
    return max(1, int(train * fraction)) if fraction is not None else int(train)


def _warmup_iters(value: Any, values: Dict[str, Any]) -> Dict[str, Any]:
    steps = _number(value)
    if steps is None or steps < 0 or not float(steps).is_integer():
        raise ConfigError(f"warmup_iters: expected a number of steps, got {value!r}", "warmup_iters")
    decay = _decay_steps(values)
    if steps > decay:
        raise ConfigError(f"warmup_iters: {int(steps)} is longer than the {decay} decay steps", "warmup_iters")
    return {"warmup": steps / decay}


def _attention_type(value: Any, values: Dict[str, Any]) -> Dict[str, Any]:
    heads, kv_heads = values.get("num_attention_heads"), values.get("num_kv_heads")
    implied = "multihead" if kv_heads in (None, heads) else "groupedquery"
    if value != implied:
        raise ConfigError(f"attention_type: '{value}' does not match num_kv_heads {kv_heads} (NeoX derives the "
                          f"attention type from num_kv_heads: '{implied}'); remove attention_type", "attention_type")
    return {}


DERIVED: Dict[str, Derived] = {
    "decay_lr_to": Derived(("min_lr",), _decay_lr_to, "the llemma branch's cosine floor as a fraction of lr"),
    "warmup_iters": Derived(("warmup",), _warmup_iters, "the llemma branch's warmup in steps"),
    "attention_type": Derived((), _attention_type, "implied by num_kv_heads in current NeoX"),
}

# a target key -> the derived keys that set it (a file setting the target replaces them)
DERIVED_BY_TARGET: Dict[str, List[str]] = {}
for _name, _derived in DERIVED.items():
    for _target in _derived.targets:
        DERIVED_BY_TARGET.setdefault(_target, []).append(_name)


def replaced_by(key: str) -> List[str]:
    """The keys that setting ``key`` on purpose (an override file, --set) replaces: itself, the
    older keys that stand for it (min_lr: decay_lr_to), and, for an older key, what it stands for."""
    return [key, *DERIVED_BY_TARGET.get(key, ()), *(DERIVED[key].targets if key in DERIVED else ())]


def resolve_derived(values: Dict[str, Any], origins: Dict[str, str]) -> List[str]:
    """Replace every derived key in ``values`` by the keys it stands for; one note each."""
    notes = []
    for key in [k for k in values if k in DERIVED]:
        derived = DERIVED[key]
        for target in derived.targets:
            if target in values:
                raise ConfigError(f"{origins[key]}: {key}: sets {target}, which {origins[target]} also sets; "
                                  f"keep one of them", key)
        try:
            converted = derived.convert(values[key], values)
        except ConfigError as e:
            raise ConfigError(f"{origins[key]}: {e}", e.key) from None
        shown = ", ".join(f"{k} = {v:.6g}" if isinstance(v, float) else f"{k} = {v!r}" for k, v in converted.items())
        notes.append(f"{key}: {values[key]!r} read as {shown} ({derived.why})" if converted
                     else f"{key}: {values[key]!r} dropped ({derived.why})")
        for target, value in converted.items():
            values[target] = value
            origins[target] = origins[key]
        del values[key]
        del origins[key]
    return notes
