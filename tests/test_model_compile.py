"""compile_model: the compiled transformer layers train like the eager ones.

Each test builds the same run twice in one process (compile_model false and true), trains both
through the trainer's own step (Sophia, a Hessian step every 2 iterations, activation
checkpointing on) and compares the per-step losses. Measured differences (fp32, CPU): 0 with
one rank and under PP = 2, up to 1.1e-7 relative under TP = 2 (inductor's fused reductions sum
in another order); the bound is 1e-5 relative.

Compile cost: the single-process graph and the PP stages' graph are the same (TP = 1 shapes), so
the second test loads it from torch's on-disk cache; TP = 2 compiles its own pieces.
"""
import pytest

from tests.distributed import run_ranks
from tests.helpers import QUICKSTART

pytestmark = pytest.mark.distributed

STEPS = 4
TOLERANCE = 1e-5


def compiled_and_eager_worker(rank, world_size, sets):
    from torch._dynamo.utils import counters

    from neox_sophia.config import load_config
    from neox_sophia.training.loop import RunResult, train_step, setup

    runs = {flag: setup(load_config([QUICKSTART], sets + [f"compile_model={flag}"], warn=False))
            for flag in ("false", "true")}
    results = {flag: RunResult(0) for flag in runs}
    for step in range(STEPS):
        for flag, run in runs.items():
            train_step(run, step, results[flag])
    names = {flag: [name for name, _ in run.engine.module.state_dict().items()] for flag, run in runs.items()}
    return {"loss": {flag: [r.train_loss[s + 1] for s in range(STEPS)] for flag, r in results.items()},
            "graphs": counters["stats"]["unique_graphs"], "captured": counters["stats"]["calls_captured"],
            "same_names": names["false"] == names["true"]}


def settings(corpus, **extra):
    values = {"data_path": corpus.data_prefix, "vocab_file": corpus.tokenizer, "seq_length": 32,
              "max_position_embeddings": 32, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2,
              "train_iters": 20, "optimizer.params.hessian_interval": 2, "checkpoint_activations": "true",
              "save": "null", "load": "null", "log_dir": "null", "eval_iters": 0, **extra}
    return [f"{key}={value}" for key, value in values.items()]


def check(ranks):
    for rank in ranks:
        eager, compiled = rank["loss"]["false"], rank["loss"]["true"]
        assert all(abs(c - e) <= TOLERANCE * abs(e) for c, e in zip(compiled, eager)), (eager, compiled)
        assert rank["captured"] > 0 and rank["same_names"]  # compiled, and checkpoints keep their keys


def test_compiled_layers_one_graph_for_all_layers(corpus):
    """Nine layers (more than torch.compile's default cache of 8 entries per function) share
    one graph: no layer falls back to eager."""
    [rank] = run_ranks(compiled_and_eager_worker, 1, args=(settings(corpus, num_layers=9),))
    check([rank])
    assert rank["graphs"] == 1


@pytest.mark.gpu
def test_compiled_layers_on_cuda(corpus):
    """fp32 on one GPU: Triton kernels instead of C++; the bound is looser (1e-4: another GEMM
    split or reduction order may differ between the two runs on a GPU)."""
    [rank] = run_ranks(compiled_and_eager_worker, 1, args=(settings(corpus, num_layers=9),), accelerator="cuda")
    eager, compiled = rank["loss"]["false"], rank["loss"]["true"]
    assert all(abs(c - e) <= 1e-4 * abs(e) for c, e in zip(compiled, eager)), (eager, compiled)
    assert rank["graphs"] == 1 and rank["same_names"]


@pytest.mark.parametrize("layout", ["model_parallel_size=2", "pipe_parallel_size=2"])
def test_compiled_layers_under_tensor_and_pipeline_parallelism(corpus, layout):
    key, value = layout.split("=")
    check(run_ranks(compiled_and_eager_worker, 2, args=(settings(corpus, **{key: value}),)))
