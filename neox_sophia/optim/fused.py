"""Sophia's step and Hessian EMA as single passes over memory, through torch.compile.

The eager kernels (kernels.py) run one pass over memory per operation (cache-sized waves hide
most of that on CPU, nothing does on a GPU). Here the same arithmetic is compiled into one loop
per tensor: a fused C++ loop on CPU, a Triton kernel on CUDA. Per parameter the step reads p, g,
m, h and writes p, m (6 words; AdamW moves 7); the EMA reads h, e and writes h (3 words), plus
its count of rejected coordinates.

Same bits as the eager path. The arithmetic (kernels.py, "one rounding per operation") uses no
operation that eager kernels fuse differently from compiled code, and the compile options below
keep Triton from contracting a*b + c into an FMA, from approximating division and from flushing
denormals. At the first use on a device each kernel is checked against the eager path on probe
values (ordinary, huge, tiny, zero, inf and NaN operands); a mismatch switches the fused path off
for the process, with a warning.

What runs fused: contiguous float32 tensors of at least MIN_NUMEL elements (whole parameters or
ZeRO's flat fp32 partitions, which bf16 and fp16 training hand the optimizer as master weights).
Everything else (small tensors, other dtypes, non-contiguous views) takes the eager path in the
same call; the result does not depend on which path a tensor took.

Recompiles. The kernels are compiled once per process and device for any tensor size (dynamic
shapes) and read every hyperparameter from a float64 tensor, so a learning rate that changes
every step, a new bias correction or another tensor size never recompiles. Compiled code is
cached on disk by torch (TORCHINDUCTOR_CACHE_DIR, default /tmp/torchinductor_$USER): a later
process loads it in seconds instead of compiling (tens of seconds on CPU).

Choice (``fused`` of Sophia, optimizer.params.fused in a config): True uses these kernels and
fails loudly if they cannot be built; False always runs eager; None (default) uses them on CUDA,
and on CPU for tensor lists of at least AUTO_CPU_NUMEL elements (where the saved time pays for
the first compile), when torch.compile works here.
"""
from __future__ import annotations

import logging
import shutil
import warnings
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

log = logging.getLogger(__name__)

FUSED_DTYPES = (torch.float32,)
# Smaller tensors (biases, norm weights) go eager: a compiled call costs ~10-30 us of dispatch.
MIN_NUMEL = 1 << 14
# fused=None on CPU: only lists this large (16M parameters) are worth the first compile.
AUTO_CPU_NUMEL = 1 << 24

COMPILE_OPTIONS = {
    # Triton: no FMA contraction (enable_fp_fusion off) and eager's rounding of low-precision
    # intermediates; CPU code is built with -ffp-contract=off already.
    "emulate_precision_casts": True,
    "eager_numerics.division_rounding": True,  # Triton's a / b is approximate otherwise
    "eager_numerics.disable_ftz": True,        # eager keeps denormals
}

STEP_SCALARS = ("decay", "sign", "momentum_coef", "rho_bs", "floor", "neg_lr", "from_m")


# ------------------------------------------------------------------------------------ kernels
def _step_kernel(p: Tensor, g: Tensor, m: Tensor, h: Tensor, s: Tensor) -> None:
    """kernels.py's step for one flat tensor; s holds STEP_SCALARS in float64. Both forms of
    the momentum are computed and one is selected, so one compiled graph serves every beta1."""
    g = g * s[1]  # maximize: an exact negation
    diff = (g - m) * s[2]
    m_new = torch.where(s[6] > 0, m + diff, g - diff)
    denom = torch.maximum(torch.maximum(h * s[3], s[4]), m_new.abs())
    p.copy_(p * s[0] + (m_new * s[5]) / denom)
    m.copy_(m_new)


def _ema_kernel(h: Tensor, e: Tensor, rejected: Tensor, s: Tensor) -> None:
    """kernels.py's guarded EMA for one flat tensor; s holds (b2, 1 - b2, square) in float64."""
    term = torch.where(s[2] > 0, e * e, e)
    new = h * s[0] + term * s[1]
    keep = torch.isfinite(new)
    h.copy_(torch.where(keep, new, h))
    rejected.add_(keep.logical_not().sum())


_KERNELS: Dict[str, Callable] = {"step": _step_kernel, "ema": _ema_kernel}
_compiled: Dict[str, Callable] = {}
_verified: Dict[Tuple[str, str], bool] = {}   # (kernel, device type) -> passed its probe
_unavailable: Dict[str, str] = {}             # device type -> why the fused path is off


def compiled(name: str) -> Callable:
    """The torch.compile'd kernel ``name`` ("step" or "ema"), built lazily."""
    if name not in _compiled:
        _compiled[name] = torch.compile(_KERNELS[name], fullgraph=True, dynamic=True,
                                        options=COMPILE_OPTIONS)
    return _compiled[name]


# ---------------------------------------------------------------------------------- the choice
def unavailable_reason(device: torch.device) -> Optional[str]:
    """Why the fused kernels cannot run on ``device`` in this process (None: they can)."""
    if device.type not in _unavailable:
        _unavailable[device.type] = _missing_compiler(device)
    return _unavailable[device.type]


def _missing_compiler(device: torch.device) -> Optional[str]:
    if device.type not in ("cpu", "cuda"):
        return f"no compiled kernels for {device.type} tensors"
    try:
        import torch._dynamo  # noqa: F401  (absent or unsupported on some platforms)
        import torch._inductor.config as inductor_config
    except Exception as error:  # noqa: BLE001  any import failure means no compiler
        return f"torch.compile is not available ({error})"
    compiler = inductor_config.cpp.cxx[-1] or "g++"
    if device.type == "cpu" and shutil.which(compiler.split()[0]) is None:
        return f"no C++ compiler ({compiler}) for torch.compile's CPU code"
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            return "Triton is not installed (torch.compile's CUDA backend)"
    return None


def use_fused(fused: Optional[bool], tensors: Sequence[Tensor]) -> bool:
    """Whether kernels.py hands ``tensors`` (one device, one dtype) to this module."""
    if fused is False or not tensors:
        return False
    device = tensors[0].device
    if fused is None:  # the size test first: small CPU runs never even import the compiler
        worth_it = device.type == "cuda" or sum(t.numel() for t in tensors) >= AUTO_CPU_NUMEL
        if tensors[0].dtype not in FUSED_DTYPES or not worth_it:
            return False
    reason = unavailable_reason(device)
    if fused is True and reason:
        raise RuntimeError(f"Sophia fused=True: {reason}; set fused to false (or null) to run "
                           f"the eager kernels")
    return reason is None


def _eligible(*tensors: Tensor) -> bool:
    first = tensors[0]
    return (first.dtype in FUSED_DTYPES and first.numel() >= MIN_NUMEL
            and all(t.dtype == first.dtype and t.device == first.device and t.is_contiguous()
                    for t in tensors))


def _split(lists: Sequence[Sequence[Tensor]]) -> Tuple[List[int], List[int]]:
    """(indices of the aligned tensors that run fused, indices of the rest)."""
    fused, rest = [], []
    for index, aligned in enumerate(zip(*lists)):
        (fused if _eligible(*aligned) else rest).append(index)
    return fused, rest


def _take(items: Sequence, indices: Sequence[int]) -> List:
    return [items[i] for i in indices]


# ------------------------------------------------------------------------------ entry points
@torch.no_grad()
def sophia_step(params: List[Tensor], grads: List[Tensor], exp_avgs: List[Tensor],
                hessians: List[Tensor], scalars: dict) -> Tuple[List[Tensor], ...]:
    """Update the eligible tensors in place; return the (params, grads, exp_avgs, hessians)
    left for the eager path."""
    lists = (params, grads, exp_avgs, hessians)
    chosen, rest = _split(lists)
    if chosen:
        device = params[chosen[0]].device
        values = step_values(scalars, device)
        if _ready("step", device):
            for i in chosen:
                compiled("step")(*(t[i].detach().view(-1) for t in lists), values)
        else:
            rest = sorted(rest + chosen)
    return tuple(_take(items, rest) for items in lists)


@torch.no_grad()
def hessian_ema(hessians: List[Tensor], estimates: List[Tensor], rejected: List[Tensor], *,
                beta2: float, square: bool) -> Tuple[List[Tensor], List[Tensor], List[Tensor]]:
    """Fold the eligible estimates into their EMA in place (counting rejected coordinates);
    return the (hessians, estimates, rejected) left for the eager path."""
    chosen, rest = _split((hessians, estimates))
    if chosen:
        device = hessians[chosen[0]].device
        values = ema_values(beta2, square, device)
        if _ready("ema", device):
            for i in chosen:
                compiled("ema")(hessians[i].detach().view(-1), estimates[i].detach().view(-1), rejected[i], values)
        else:
            rest = sorted(rest + chosen)
    return _take(hessians, rest), _take(estimates, rest), _take(rejected, rest)


def step_values(scalars: dict, device: torch.device) -> Tensor:
    return torch.tensor([float(scalars[k]) for k in STEP_SCALARS], dtype=torch.float64, device=device)


def ema_values(beta2: float, square: bool, device: torch.device) -> Tensor:
    return torch.tensor([beta2, 1.0 - beta2, float(square)], dtype=torch.float64, device=device)


# ------------------------------------------------------------------------- first-use check
def _ready(name: str, device: torch.device) -> bool:
    """Compile kernel ``name`` for ``device`` and check it against the eager path once; False
    (with a warning, for the rest of the process) when either fails."""
    key = (name, device.type)
    if key not in _verified:
        try:
            mismatch = _PROBES[name](device)
        except Exception as error:  # noqa: BLE001  a compiler failure of any kind
            mismatch = f"compiling failed: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        _verified[key] = mismatch is None
        if mismatch is None:
            log.info("Sophia: the fused %s kernel is compiled and checked on %s", name, device.type)
        else:
            _unavailable[device.type] = f"the fused {name} kernel {mismatch}"
            warnings.warn(f"Sophia: fused kernels switched off on {device.type}: {_unavailable[device.type]}; "
                          f"running the eager kernels (same results, slower)", RuntimeWarning, stacklevel=3)
    return _verified[key]


def probe_values(numel: int, device: torch.device, seed: int) -> Tensor:
    """float32 values over many magnitudes, with zeros, huge and tiny numbers, inf and NaN."""
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(numel, generator=g) * torch.exp2(torch.randint(-60, 60, (numel,), generator=g).float())
    special = torch.tensor([0.0, -0.0, 3e38, -3e38, 1e-40, float("inf"), -float("inf"), float("nan")])
    picks = torch.randint(0, numel, (numel // 16,), generator=g)
    values[picks] = special[torch.randint(0, len(special), (len(picks),), generator=g)]
    return values.to(device)


PROBE_NUMEL = MIN_NUMEL + 37  # not a multiple of any vector width: the loops' tails run too


def _same(a: Tensor, b: Tensor) -> bool:
    """Equal bits, NaN included (any NaN matches any NaN: payloads are not specified)."""
    both_nan = torch.isnan(a) & torch.isnan(b)
    return bool(((a.view(torch.int32) == b.view(torch.int32)) | both_nan).all())


def _probe_step(device: torch.device) -> Optional[str]:
    from neox_sophia.optim.kernels import _single_tensor_update, sophia_scalars

    for seed, beta1 in ((0, 0.965), (1, 0.3)):
        p, g, m, h = (probe_values(PROBE_NUMEL, device, 4 * seed + k) for k in range(4))
        h = h.abs()
        scalars = sophia_scalars(lr=6e-4, beta1=beta1, rho=0.05, bs=4096, eps=1e-15, weight_decay=0.1)
        ours = [p.clone(), m.clone()]
        compiled("step")(ours[0], g, ours[1], h, step_values(scalars, device))
        _single_tensor_update(p, g, m, h, **scalars)
        if not (_same(ours[0], p) and _same(ours[1], m)):
            return f"differs from the eager kernels on probe values (beta1 {beta1})"
    return None


def _probe_ema(device: torch.device) -> Optional[str]:
    from neox_sophia.optim.kernels import _guarded_ema_, ema_factors

    for square in (True, False):
        h, e = probe_values(PROBE_NUMEL, device, 10).nan_to_num(0.0), probe_values(PROBE_NUMEL, device, 11)
        ours, count = h.clone(), torch.zeros((), device=device)
        compiled("ema")(ours, e, count, ema_values(0.99, square, device))
        expected_count = torch.zeros((), device=device)
        _guarded_ema_(h, e, expected_count, factors=ema_factors(0.99, device), square=square)
        if not (_same(ours, h) and bool(count == expected_count)):
            return f"differs from the eager kernels on probe values (square={square})"
    return None


_PROBES = {"step": _probe_step, "ema": _probe_ema}
