"""The model as a DeepSpeed PipelineModule: same weights and same loss as the plain module."""
import pytest
import torch

from neox_sophia.config.model import ParallelConfig
from neox_sophia.model.gpt_neox import GPTNeoX, full_state_dict
from neox_sophia.model.layers import lm_loss
from neox_sophia.model.pipeline import build_pipeline
from neox_sophia.parallel.topology import initialize_model_parallel
from tests.distributed import run_ranks
from tests.helpers import NEOX_SEED, PADDED, neox_tokens, tiny_config

pytestmark = pytest.mark.distributed


def batch():
    x = neox_tokens()
    labels = torch.roll(x, -1, dims=1)
    mask = torch.ones_like(x)
    mask[:, -1] = 0
    return x, labels, mask


def model_config(tied):
    cfg = tiny_config(True, 0.25)
    cfg.num_layers = 3  # an odd count: the stages hold different numbers of layers
    cfg.no_weight_tying = not tied
    return cfg


def pp2_worker(rank, world_size):
    import deepspeed

    grid = initialize_model_parallel(1, 2)
    out = {}
    for tied in (False, True):
        pipe = build_pipeline(model_config(tied), ParallelConfig(pipe_parallel_size=2), PADDED, grid, NEOX_SEED)
        weights = full_state_dict(pipe)
        engine, *_ = deepspeed.initialize(model=pipe, config={
            "train_micro_batch_size_per_gpu": 3, "gradient_accumulation_steps": 1,
            "steps_per_print": 10 ** 9})
        x, labels, mask = batch()
        loss = engine.eval_batch(iter([(x, (labels, mask))]))
        out[str(tied)] = {"weights": weights, "loss": loss.detach().clone(), "stage": grid.pp_rank}
    return out


def test_pp2_has_the_same_weights_and_loss_as_one_process():
    ranks = run_ranks(pp2_worker, 2)
    grid = initialize_model_parallel(1, 1)
    for tied in (False, True):
        model = GPTNeoX(model_config(tied), PADDED, grid, seed=NEOX_SEED).eval()
        single = model.full_state_dict()
        x, labels, mask = batch()
        expected = lm_loss(model(x), labels, mask)
        stages = [r[str(tied)] for r in ranks]
        assert sorted(s["stage"] for s in stages) == [0, 1]
        merged = {}
        for s in stages:
            assert 0 < len(s["weights"]) < len(single) + tied  # each stage holds part of the model
            for name, w in s["weights"].items():
                assert torch.equal(w, single[name]), name
                merged[name] = w
        assert merged.keys() == single.keys()
        for s in stages:
            torch.testing.assert_close(s["loss"].reshape(()), expected, rtol=1e-6, atol=1e-6)


def test_build_model_follows_pipe_parallel_size():
    """NeoX semantics: 0 is a plain module, 1 is a one-stage PipelineModule; same weights."""
    from deepspeed.pipe import PipelineModule

    from neox_sophia.model import build_model

    grid = initialize_model_parallel(1, 1)
    cfg = model_config(tied=False)
    plain = build_model(cfg, ParallelConfig(pipe_parallel_size=0), PADDED, grid, NEOX_SEED)
    piped = build_model(cfg, ParallelConfig(pipe_parallel_size=1), PADDED, grid, NEOX_SEED)
    assert isinstance(plain, GPTNeoX) and isinstance(piped, PipelineModule)
    a, b = full_state_dict(plain), full_state_dict(piped)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
