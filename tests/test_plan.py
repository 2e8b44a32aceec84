"""`neox-sophia plan`: parameter counts from the built (meta) model against the closed form,
per-rank memory against the ZeRO/TP/PP arithmetic, and the CLI on the 1.5B and 6.6B configs."""
import json
import os

import pytest

from neox_sophia.cli import main
from neox_sophia.config import load_config
from neox_sophia.plan import GIB, plan_config
from tests.helpers import ROOT, neox_parameters

CONFIGS = os.path.join(ROOT, "configs")


def files(model, optimizer="sophia"):
    return [os.path.join(CONFIGS, f) for f in (f"{model}.yml", f"{optimizer}.yml", "pile.yml")]


@pytest.mark.parametrize("model", ["125M", "1-5B", "6-6B"])
def test_parameter_count_matches_closed_form(model):
    cfg = load_config(files(model))
    result = plan_config(cfg, world_size=cfg.default_world_size)
    m = cfg.model
    assert result["vocab_size"] == 50277 and result["padded_vocab_size"] == cfg.padded_vocab_size(50277)
    assert result["parameters"] == neox_parameters(m.num_layers, m.hidden_size, result["padded_vocab_size"],
                                                   tied=not m.no_weight_tying)


def test_memory_follows_zero_tp_pp_arithmetic():
    cfg = load_config(files("1-5B"), overrides=["pipe_parallel_size=2", "model_parallel_size=2",
                                                "zero_optimization={stage: 1}", "precision=bfloat16"])
    result = plan_config(cfg, world_size=16)  # TP 2 x PP 2 x DP 4
    assert result["layout"]["dp"] == 4 and len(result["parameters_per_stage"]) == 2
    n = result["parameters_per_rank"]
    assert n == max(result["parameters_per_stage"])
    # a stage holds its share of the (TP-sharded) model: between a quarter and a half of it
    assert result["parameters"] / 4 * 0.9 < n < result["parameters"] / 2
    mem = {k: v * GIB for k, v in result["memory_gib"].items()}
    assert mem["weights"] == pytest.approx(2 * n) and mem["gradients"] == pytest.approx(2 * n)
    assert mem["master_weights"] == pytest.approx(4 * n / 4)
    assert mem["exp_avg"] == pytest.approx(4 * n / 4) and mem["hessian"] == pytest.approx(4 * n / 4)

    zero2 = plan_config(load_config(files("1-5B"), overrides=["zero_optimization={stage: 2}",
                                                              "pipe_parallel_size=0"]), world_size=8)
    n2 = zero2["parameters_per_rank"]
    assert n2 == zero2["parameters"]
    assert zero2["memory_gib"]["gradients"] * GIB == pytest.approx(n2 * zero2["layout"]["dp"] ** -1 *
                                                                   (2 if zero2["layout"]["precision"] != "fp32" else 4))
    adamw = plan_config(load_config(files("1-5B", "adamw")), world_size=8)
    assert "exp_avg_sq" in adamw["memory_gib"] and "hessian" not in adamw["memory_gib"]
    # Sophia's state costs exactly what AdamW's does
    assert adamw["optimizer_state_gib_per_rank"] == pytest.approx(
        plan_config(load_config(files("1-5B")), world_size=8)["optimizer_state_gib_per_rank"])


def test_activation_checkpointing_and_fit():
    cfg = load_config(files("6-6B"))
    result = plan_config(cfg, world_size=64, gpu_memory_gib=80)
    act = result["activations_gib"]
    assert act["with_checkpointing"] < act["without_checkpointing"]
    assert plan_config(cfg, world_size=64, gpu_memory_gib=1)["fits"] is False
    assert plan_config(cfg, world_size=64, gpu_memory_gib=10_000)["fits"] is True


@pytest.mark.parametrize("model", ["1-5B", "6-6B"])
def test_cli_plan_json_and_text(model, capsys):
    assert main(["plan", *files(model), "--world-size", "64", "--gpu-memory", "80GB", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert {"parameters", "padded_vocab_size", "memory_gib", "fits"} <= set(result)
    assert result["gpu_memory_gib"] == 80.0
    assert main(["plan", *files(model), "--world-size", "64"]) == 0
    text = capsys.readouterr().out
    assert f"{result['parameters']:,}" in text and "hessian" in text


def test_cli_plan_reports_config_errors(capsys, tmp_path):
    assert main(["plan", *files("1-5B"), "--set", "hiden_size=3"]) == 2
    assert "did you mean 'hidden_size'" in capsys.readouterr().err
    assert main(["plan", *files("1-5B"), "--world-size", "3", "--set", "model_parallel_size=2"]) == 2
    assert "world size 3" in capsys.readouterr().err


@pytest.mark.parametrize("model,tied", [("125M", None), ("125M", True), ("1-5B", None)])
def test_model_flops_per_token_counts_every_matmul_weight_of_the_built_model(model, tied):
    """6 FLOPs per weight that multiplies an activation, counted from the real modules (every
    2-D weight; a tied output layer once more, the input embedding lookup not), plus the
    attention term 12 x layers x hidden x seq."""
    import torch

    from neox_sophia.model.gpt_neox import build_blocks
    from neox_sophia.parallel.topology import initialize_model_parallel
    from neox_sophia.plan import model_flops_per_token

    cfg = load_config(files(model), overrides=[] if tied is None else [f"no_weight_tying={not tied}"])
    m, vocab = cfg.model, cfg.padded_vocab_size(50277)
    initialize_model_parallel(1, 1)
    with torch.device("meta"):
        blocks = build_blocks(m, vocab, tp_size=1)
    weights = [p.numel() for b in blocks[1:] for p in b.parameters() if p.dim() == 2]
    output = vocab * m.hidden_size if not m.no_weight_tying else 0  # the tied output reuses the embedding
    expected = 6 * (sum(weights) + output) + 12 * m.num_layers * m.hidden_size * m.seq_length
    assert model_flops_per_token(m, vocab) == expected
