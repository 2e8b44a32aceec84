"""One training step, one Sophia Hessian step and one evaluation, for both DeepSpeed engines.

Data layout (docs/design.md, invariant 2; neox_sophia.data.datasets.sample_indices): optimizer step s
consumes the global samples [s*B, (s+1)*B), B = train_batch_size. Which rank computes a sample
changes with the layout; the set of samples in a step, and every sample's content and sampled
labels, do not.

The Hessian step runs *through* the engine, so DeepSpeed reduces, unscales and clips the
sampled-label gradient exactly like a training gradient, then calls the client optimizer's
step(): `redirected_step` points that call at `update_hessian()` (or at nothing, to skip a step
whose loss was not finite) and undoes the engine's step and sample counters afterwards. The LR
schedule is ours and advances only on real steps. Sophia-H's step (plain_hutchinson_step) goes
through the same engine step, with clipping off: what it reduces is u * (H u), not a gradient.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List

import torch
import torch.distributed as dist

from neox_sophia.model.layers import lm_loss
from neox_sophia.optim.hessian import central_differences
from neox_sophia.parallel.sampling import label_uniforms, sampled_label_loss


@dataclass
class MicroBatch:
    tokens: torch.Tensor      # [mb, s]
    labels: torch.Tensor      # [mb, s]
    loss_mask: torch.Tensor   # [mb, s]
    indices: List[int]        # global sample indices
    weight: float = 1.0       # a Hessian micro-batch's loss factor (hessian_batches)


def collate(dataset, indices, device: torch.device) -> MicroBatch:
    samples = [dataset[i] for i in indices]
    stack = lambda key: torch.stack([torch.as_tensor(s[key]) for s in samples]).to(device)  # noqa: E731
    return MicroBatch(stack("tokens").long(), stack("labels").long(), stack("loss_mask").float(), list(indices))


def hessian_batches(dataset, start: int, size: int, micro_steps: int, layout, dp_rank: int,
                    device: torch.device) -> List[MicroBatch]:
    """This rank's micro-batches of the Hessian batch of ``size`` sequences that starts at stream
    position ``start`` (NeoXConfig.hessian_batch): position p of the batch sits where a training
    step's sample p would, rows at p >= size are padding (the batch's first sample, loss mask 0).
    Each micro-batch's mean loss is weighted by real rows x DP x accumulation steps / size:
    DeepSpeed divides every backward by the accumulation steps and averages over DP, so the
    gradient is the mean over exactly ``size`` sequences whatever the layout."""
    from neox_sophia.data.datasets import sample_indices

    dp, micro, accumulation = layout.dp, layout.micro_batch_size, layout.gradient_accumulation_steps
    batches = []
    for m in range(micro_steps):
        positions = sample_indices(0, m, dp_rank, dp, micro, micro_steps)
        real = sum(p < size for p in positions)  # positions ascend: the real rows come first
        batch = collate(dataset, [start + (p if p < size else 0) for p in positions], device)
        batch.loss_mask[real:] = 0
        batch.weight = real * dp * accumulation / size
        batches.append(batch)
    return batches


@contextlib.contextmanager
def redirected_step(engine, client_optimizer, replacement: Callable[[], None],
                    restore_counters: bool = True) -> Iterator[None]:
    """Within the block, the engine's optimizer step calls ``replacement`` instead of the client
    optimizer's step; the engine's step/sample counters are restored on exit unless told not to."""
    steps, samples, micro = engine.global_steps, engine.global_samples, engine.micro_steps
    own = vars(client_optimizer).get("step")
    client_optimizer.step = lambda *args, **kwargs: replacement()
    try:
        yield
    finally:
        if own is None:
            del client_optimizer.step
        else:
            client_optimizer.step = own
        if restore_counters:
            engine.global_steps, engine.global_samples, engine.micro_steps = steps, samples, micro


def for_collective(value: torch.Tensor) -> torch.Tensor:
    """``value`` where this rank's process group can reduce it: NCCL reduces CUDA tensors only,
    and under CPU offload the optimizer's partitions (and what is computed from them) are on CPU."""
    if value.device.type == "cpu" and dist.is_initialized() and dist.get_backend() == "nccl":
        return value.to(torch.device("cuda", torch.cuda.current_device()))
    return value


def all_finite(value: torch.Tensor) -> bool:
    return on_every_rank(torch.isfinite(value.detach()).all())


def on_every_rank(ok) -> bool:
    """Whether ``ok`` (a bool tensor or a bool) holds on every rank (reduced where the process
    group can: for_collective)."""
    flag = for_collective(torch.as_tensor(ok).to(torch.float32).reshape(1))
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item() == 1.0)


def zero_loss(module: torch.nn.Module) -> torch.Tensor:
    """A loss whose gradient is exactly zero for every parameter (keeps DeepSpeed's reductions
    and counters in step when a micro-batch is thrown away)."""
    return sum((p * 0).sum() for p in module.parameters() if p.requires_grad)


def mean_across(value: torch.Tensor, group=None) -> float:
    value = value.detach().float().clone().reshape(1)
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(value, group=group)
        value /= dist.get_world_size(group)
    return float(value.item())


@dataclass
class StepOutcome:
    loss: float
    finite: bool


def plain_train_step(engine, client_optimizer, batches: List[MicroBatch], dp_group=None) -> StepOutcome:
    """pipe_parallel_size 0: forward/backward every micro-batch, one optimizer step. A micro-batch
    whose loss is not finite on any rank makes the whole step a no-op."""
    engine.train()
    losses, finite = [], True
    for batch in batches:
        loss = lm_loss(engine(batch.tokens), batch.labels, batch.loss_mask)
        ok = all_finite(loss)
        finite &= ok
        engine.backward(loss if ok else zero_loss(engine.module))
        if finite or batch is not batches[-1]:
            engine.step()
        else:  # the counters advance as for a real step: DeepSpeed finds the accumulation boundary by
            # its micro-step count, which restored would put the next step's update after its first micro-batch
            with redirected_step(engine, client_optimizer, lambda: None, restore_counters=False):
                engine.step()
        losses.append(loss.detach())
    return StepOutcome(mean_across(torch.stack(losses).mean(), dp_group), finite)


def plain_hessian_step(engine, client_optimizer, batches: List[MicroBatch], uniforms: List[torch.Tensor],
                       vocab_size: int, tp_group=None) -> float:
    """Sophia-G's Hessian refresh on a plain module: sampled-label loss on ``batches`` (any number
    of micro-batches, often fewer than a training step's), backward, and one engine step whose
    optimizer call is update_hessian(). Each micro-batch's loss is scaled by its ``weight``
    (hessian_batches), so the gradient is the mean over the Hessian batch."""
    engine.train()
    losses = []
    try:
        for batch, u in zip(batches, uniforms):
            engine.set_gradient_accumulation_boundary(batch is batches[-1])
            loss = sampled_label_loss(engine(batch.tokens), u, batch.loss_mask, vocab_size, tp_group)
            engine.backward(loss * batch.weight)
            losses.append(loss.detach())
        with redirected_step(engine, client_optimizer, client_optimizer.update_hessian):
            engine.step()
    finally:
        engine.set_gradient_accumulation_boundary(None)  # back to DeepSpeed's own micro-step count
    return float(torch.stack(losses).mean())


@contextlib.contextmanager
def gradient_clipping_off(engine) -> Iterator[None]:
    """Within the block neither the engine (plain fp32) nor its ZeRO optimizer clips: what goes
    through the engine there is not a gradient. Both settings are restored on exit."""
    zero = engine.optimizer if hasattr(engine.optimizer, "clip_grad") else None
    engine_clip, zero_clip = engine._config.gradient_clipping, zero.clip_grad if zero else None
    engine._config.gradient_clipping = 0.0
    if zero is not None:
        zero.clip_grad = 0.0
    try:
        yield
    finally:
        engine._config.gradient_clipping = engine_clip
        if zero is not None:
            zero.clip_grad = zero_clip


@contextlib.contextmanager
def probe_hooks(probes: Dict[torch.nn.Parameter, torch.Tensor]) -> Iterator[Dict[str, float]]:
    """While active, each parameter's incoming gradient g becomes scale * u * g (u: its probe),
    before DeepSpeed accumulates or reduces it: a tensor hook runs before the parameter's
    post-accumulate hooks, where the engines reduce. Yields the mutable {"scale": ...}."""
    setting = {"scale": 0.0}
    handles = [param.register_hook(lambda grad, u=u: grad.mul(u).mul_(setting["scale"]))
               for param, u in probes.items()]
    try:
        yield setting
    finally:
        for handle in handles:
            handle.remove()


def plain_hutchinson_step(engine, client_optimizer, batches: List[MicroBatch],
                          probes: Dict[torch.nn.Parameter, torch.Tensor], fd_eps: float) -> float:
    """Sophia-H's Hessian refresh on a plain module: u * (H u) of the training loss on
    ``batches`` (true labels), H u by central differences of the gradient, through the engine.

    Two passes over the Hessian batch, at theta + e*u and at theta - e*u (e = fd_eps, the same
    dropout masks): a hook turns each rank's gradient g into +-u*g/(2e) before the engine reduces
    it, so the gradient slot the engine hands the optimizer holds u * (g+ - g-) / (2e) averaged
    over the data-parallel ranks: u * (H u) of the mean loss over the whole Hessian batch. The
    optimizer folds it in as it is (update_hessian(square=False)), unclipped. The parameters are
    theta again, bit for bit, before the engine steps (the ZeRO fp32 master partition is never
    touched). Returns the mean loss of the two passes (the loss at theta, to O(e^2))."""
    engine.train()
    losses = []
    try:
        with gradient_clipping_off(engine):
            with probe_hooks(probes) as hook, central_differences(list(probes), list(probes.values()),
                                                                 fd_eps) as shift:
                for sign in (1, -1):
                    shift(sign)
                    hook["scale"] = sign / (2 * fd_eps)
                    for batch in batches:
                        engine.set_gradient_accumulation_boundary(sign < 0 and batch is batches[-1])
                        loss = lm_loss(engine(batch.tokens), batch.labels, batch.loss_mask)
                        engine.backward(loss * batch.weight)  # the mean over exactly H sequences (hessian_batches)
                        losses.append(loss.detach())
            with redirected_step(engine, client_optimizer, lambda: client_optimizer.update_hessian(square=False)):
                engine.step()
    finally:
        engine.set_gradient_accumulation_boundary(None)  # back to DeepSpeed's own micro-step count
    return float(torch.stack(losses).mean())


def gradients_finite(optimizer: torch.optim.Optimizer) -> bool:
    """Whether every gradient the optimizer is about to apply is finite, on every rank (under
    ZeRO each rank holds a different partition)."""
    flags = [torch.isfinite(p.grad).all() for group in optimizer.param_groups for p in group["params"]
             if p.grad is not None]
    return all_finite(torch.stack(flags) if flags else torch.ones(1, dtype=torch.bool))


def pipeline_train_step(engine, client_optimizer, batches: List[MicroBatch]) -> StepOutcome:
    """pipe_parallel_size >= 1: the PipelineEngine runs the schedule and the optimizer step. The
    loss is known only after that step, so the step itself checks the gradients and is skipped
    when any is not finite (a non-finite loss makes non-finite gradients)."""
    applied = [True]

    def guarded() -> None:
        if gradients_finite(client_optimizer):
            type(client_optimizer).step(client_optimizer)
        else:
            applied[0] = False

    data = iter([(b.tokens, (b.labels, b.loss_mask)) for b in batches])
    with redirected_step(engine, client_optimizer, guarded, restore_counters=False):
        loss = engine.train_batch(data_iter=data)
    return StepOutcome(float(loss), applied[0] and bool(torch.isfinite(loss)))


def pipeline_hessian_step(engine, client_optimizer, batches: List[MicroBatch], uniforms: List[torch.Tensor],
                          vocab_size: int, tp_group=None) -> float:
    """The Hessian refresh under the PipelineEngine: the schedule runs len(batches) micro-batches,
    the last stage's loss function samples labels (the uniforms and each micro-batch's weight
    travel in the labels slot of the batch), and the schedule's optimizer step is redirected to
    update_hessian(). Returns the schedule's mean of the weighted losses."""
    module = engine.module
    original, micro_batches = module.loss_fn, engine.micro_batches

    def gnb(logits, uniforms_mask_weight):
        u, mask, weight = uniforms_mask_weight
        return sampled_label_loss(logits, u, mask, vocab_size, tp_group) * weight

    module.loss_fn, engine.micro_batches = gnb, len(batches)
    try:
        data = iter([(b.tokens, (u, b.loss_mask, torch.tensor(b.weight, dtype=torch.float32)))
                     for b, u in zip(batches, uniforms)])
        with redirected_step(engine, client_optimizer, client_optimizer.update_hessian):
            loss = engine.train_batch(data_iter=data)
    finally:
        module.loss_fn, engine.micro_batches = original, micro_batches
    return float(loss)


def hessian_uniforms(seed: int, hessian_step: int, batches: List[MicroBatch], seq_length: int) -> List[torch.Tensor]:
    return [label_uniforms(seed, hessian_step, b.indices, seq_length) for b in batches]


@torch.no_grad()
def evaluate(engine, batches: List[MicroBatch], pipeline: bool, dp_group=None) -> float:
    engine.eval()
    if pipeline:
        data = iter([(b.tokens, (b.labels, b.loss_mask)) for b in batches])
        return float(engine.eval_batch(data_iter=data, num_micro_batches=len(batches)))
    losses = [lm_loss(engine(b.tokens), b.labels, b.loss_mask) for b in batches]
    return mean_across(torch.stack(losses).mean(), dp_group)
