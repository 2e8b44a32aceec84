"""NeoX's finetune and no_load_optim, end to end: a run trained with AdamW at TP=2 continues with
Sophia, from its GPT-NeoX-layout export at TP=2 (no_load_optim: its step, fresh optimizer and LR
schedule) and from its own save directory at TP=1 (finetune: step 0). The weights the new run
starts from are the AdamW run's final weights exactly (fp32 all the way)."""
import os
from types import SimpleNamespace

import pytest
import torch

from tests.distributed import run_ranks
from tests.helpers import QUICKSTART, overrides

pytestmark = pytest.mark.distributed

ADAMW = "optimizer={type: adamw, params: {lr: 2.0e-3, betas: [0.9, 0.95]}}"


def resume_worker(rank, world_size, sets):
    from neox_sophia.config import load_config
    from neox_sophia.model.gpt_neox import full_state_dict
    from neox_sophia.training.loop import resume_from_load, setup, train_loop

    run = setup(load_config([QUICKSTART], sets, warn=False))
    start, _ = resume_from_load(run)
    loaded = full_state_dict(run.engine.module)
    lr_at_start = (run.scheduler.get_last_lr()[0], run.cfg.lr_schedule().lr_at(0), run.cfg.lr_schedule().lr_at(start))
    result = train_loop(run, start)
    hessian = [s["hessian"] for s in run.optimizer.state.values() if "hessian" in s]
    return {"start": start, "loaded": loaded, "weights": full_state_dict(run.engine.module), "lr_at_start": lr_at_start,
            "loss": result.train_loss, "hessian_updates": result.hessian_updates,
            "hessian_abs_sum": float(sum(h.abs().sum() for h in hessian)) if hessian else None}


def settings(corpus, run_dir, **extra):
    values = dict(train_iters=6, lr_decay_iters=10, eval_iters=0, checkpoint_factor=6)
    sets = overrides(corpus, run_dir, **{**values, **extra})
    return [s for s in sets if not s.startswith("optimizer.")]  # each test names its optimizer


@pytest.fixture(scope="module")
def adamw_tp2(corpus, tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("adamw"))
    out = run_ranks(resume_worker, 2, args=(settings(corpus, run_dir, model_parallel_size=2) + [ADAMW],))
    return run_dir, out[0]["weights"]


def test_adamw_run_continues_with_sophia_from_its_neox_export_with_no_load_optim(corpus, adamw_tp2, tmp_path):
    from neox_sophia.cli import main

    run_dir, final = adamw_tp2
    neox = str(tmp_path / "neox")
    assert main(["convert", "to-neox", "--checkpoint", os.path.join(run_dir, "ckpt"), "--output", neox]) == 0
    assert sorted(os.listdir(os.path.join(neox, "global_step6")))[:2] == ["configs", "mp_rank_00_model_states.pt"]
    sets = settings(corpus, str(tmp_path / "sophia"), model_parallel_size=2, train_iters=10, load=neox,
                    no_load_optim=True)
    sets.append("optimizer={type: sophia, params: {lr: 1.0e-3, hessian_interval: 2, hessian_batch_size: 2}}")
    out = run_ranks(resume_worker, 2, args=(sets,))[0]
    assert out["start"] == 6 and sorted(out["loss"]) == [7, 8, 9, 10]  # the step continues
    for name, w in final.items():
        assert torch.equal(out["loaded"][name], w), name
    lr, fresh, continued = out["lr_at_start"]  # NeoX does not load the LR scheduler under no_load_optim
    assert lr == fresh != continued
    assert out["hessian_updates"] == 2 and out["hessian_abs_sum"] > 0
    assert all(torch.isfinite(torch.tensor(list(out["loss"].values()))))


def test_finetune_from_our_own_save_dir_at_another_layout_starts_at_step_0(corpus, adamw_tp2, tmp_path):
    run_dir, final = adamw_tp2
    sets = settings(corpus, str(tmp_path / "ft"), train_iters=3, load=os.path.join(run_dir, "ckpt"), finetune=True)
    sets.append("optimizer={type: sophia, params: {lr: 1.0e-3, hessian_interval: 2, hessian_batch_size: 2}}")
    out = run_ranks(resume_worker, 1, args=(sets,))[0]
    assert out["start"] == 0 and sorted(out["loss"]) == [1, 2, 3] and out["lr_at_start"][0] == out["lr_at_start"][1]
    for name, w in final.items():
        assert torch.equal(out["loaded"][name], w), name


def _resume_of(tmp_path, **checkpoint):
    from neox_sophia.training.loop import resume_from_load

    fields = dict(load=None, save=None, finetune=False, no_load_optim=False)
    fields.update(checkpoint)
    return resume_from_load(SimpleNamespace(cfg=SimpleNamespace(checkpoint=SimpleNamespace(**fields))))


def test_a_neox_checkpoint_without_finetune_or_no_load_optim_is_refused_in_one_line(tmp_path):
    from neox_sophia.training.loop import TrainingError

    neox = tmp_path / "neox" / "global_step5"
    neox.mkdir(parents=True)
    torch.save({"module": {}, "iteration": 5}, neox / "mp_rank_00_model_states.pt")
    (tmp_path / "neox" / "latest").write_text("global_step5")
    with pytest.raises(TrainingError, match=r"^load: .* is a GPT-NeoX checkpoint; .* set finetune: true .* or "
                                            r"no_load_optim: true .*\)$"):
        _resume_of(tmp_path, load=str(tmp_path / "neox"))


def test_finetune_into_a_save_dir_with_checkpoints_is_refused(tmp_path):
    from neox_sophia.training.checkpoint import CheckpointError

    save = tmp_path / "save" / "global_step4"
    save.mkdir(parents=True)
    (save / "complete").write_text("{}")
    with pytest.raises(CheckpointError, match=r"^finetune: true starts again at step 0, but save: .* up to step 4"):
        _resume_of(tmp_path, load=str(tmp_path / "elsewhere"), save=str(tmp_path / "save"), finetune=True)
