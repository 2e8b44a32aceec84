"""The offline checkpoint reader, the universal checkpoint and `inspect`.

Tiny runs (4 steps, Hessian refreshed at steps 2 and 4, a checkpoint at the end) at the layouts
the trainer writes differently: one process (ZeRO 0, fp32), DP2 ZeRO-1, DP2 ZeRO-2, TP2, PP2,
TP2 x PP2 ZeRO-1, bf16 at ZeRO 0, and an AdamW run. Each run also returns what the live engine
holds (independently gathered: DeepSpeed's fragment API over ZeRO partitions, TP shards
concatenated, every pipeline stage's names merged), and the reader must reproduce it exactly,
offline, in one process.
"""
import json
import os
import shutil

import pytest
import torch
import yaml

from tests.distributed import run_ranks
from tests.helpers import QUICKSTART, cli, overrides

pytestmark = pytest.mark.distributed

COMMON = dict(train_iters=4, lr_decay_iters=4, eval_iters=0, **{"optimizer.params.hessian_interval": 2})
ADAMW = {"type": "adamw", "params": {"lr": 2.0e-3, "betas": [0.9, 0.95]}}

# name: (world size, overrides, the layout the reader must report)
LAYOUTS = {
    "single": (1, {}, dict(tp=1, pp=0, dp=1, zero_stage=0, precision="fp32")),
    "dp2-zero1": (2, dict(train_micro_batch_size_per_gpu=1, zero_optimization={"stage": 1}),
                  dict(tp=1, pp=0, dp=2, zero_stage=1, precision="fp32")),
    "dp2-zero2": (2, dict(train_micro_batch_size_per_gpu=1, zero_optimization={"stage": 2}),
                  dict(tp=1, pp=0, dp=2, zero_stage=2, precision="fp32")),
    "tp2": (2, dict(model_parallel_size=2), dict(tp=2, pp=0, dp=1, zero_stage=0, precision="fp32")),
    "pp2": (2, dict(pipe_parallel_size=2), dict(tp=1, pp=2, dp=1, zero_stage=0, precision="fp32")),
    "tp2-pp2-zero1": (4, dict(model_parallel_size=2, pipe_parallel_size=2, zero_optimization={"stage": 1}),
                      dict(tp=2, pp=2, dp=1, zero_stage=1, precision="fp32")),
    "bf16": (1, dict(precision="bfloat16"), dict(tp=1, pp=0, dp=1, zero_stage=0, precision="bfloat16")),
    "adamw": (1, dict(optimizer=ADAMW), dict(tp=1, pp=0, dp=1, zero_stage=0, precision="fp32")),
}


def reference_worker(rank, world_size, sets):
    """Train, checkpoint, and return what the live engine holds, gathered to full tensors."""
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
    from deepspeed.utils import safe_get_full_fp32_param

    from neox_sophia.config import load_config
    from neox_sophia.model.gpt_neox import full_state_dict, global_named_parameters
    from neox_sophia.model.layers import tensor_parallel_dim
    from neox_sophia.parallel.topology import gather_tensor_parallel
    from neox_sophia.training.loop import setup, train_loop
    from tests.gathered import optimizer_state_by_name

    run = setup(load_config([QUICKSTART], sets, warn=False))
    train_loop(run)
    engine, optimizer = run.engine, run.optimizer
    keys = ("exp_avg", "hessian") if run.cfg.optimizer.type == "sophia" else ("exp_avg", "exp_avg_sq")
    named = list(global_named_parameters(engine.module))

    def full(t, p):
        t = t.detach().float().reshape(p.shape)
        return gather_tensor_parallel(t, dim=p.partition_dim) if getattr(p, "tensor_model_parallel", False) else t

    masters = {}
    if isinstance(engine.optimizer, FP16_UnfusedOptimizer):  # bf16 at ZeRO 0: fp32 copies the optimizer steps
        for lows, highs in zip(engine.optimizer.fp16_groups, engine.optimizer.fp32_groups):
            masters.update({id(lo): hi for lo, hi in zip(lows, highs)})
        state = {name: {k: full(optimizer.state[masters[id(p)]][k], p).clone() for k in keys} for name, p in named}
    else:
        state = optimizer_state_by_name(engine, optimizer, keys)  # re-links ZeRO's fragments first
    weights = {}
    for name, p in named:
        if id(p) in masters:
            w = masters[id(p)]
        elif hasattr(p, "_hp_mapping"):  # ZeRO / bf16 optimizer: the fp32 master (a collective)
            w = safe_get_full_fp32_param(p)
        else:
            w = p
        weights[name] = full(w, p).clone()
    marked = {name: (p.partition_dim if getattr(p, "tensor_model_parallel", False) else None) for name, p in named}
    return {"weights": weights, "module": full_state_dict(engine.module), "state": state,
            "tp_disagreements": [(n, d, tensor_parallel_dim(n)) for n, d in marked.items()
                                 if tensor_parallel_dim(n) != d]}


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    """layout -> (save dir, the live engine's state merged over ranks); each layout trains once."""
    cache = {}

    def get(layout):
        if layout not in cache:
            world, extra, _ = LAYOUTS[layout]
            extra = dict(extra)
            run_dir = str(tmp_path_factory.mktemp(layout))
            block = extra.pop("optimizer", None)
            sets = overrides(corpus, run_dir, **COMMON, **extra)
            if block:
                sets = [s for s in sets if not s.startswith("optimizer.")] + [f"optimizer={json.dumps(block)}"]
            out = run_ranks(reference_worker, world, args=(sets,))
            merged = {key: {name: value for rank in out for name, value in rank[key].items()}
                      for key in ("weights", "module", "state")}
            merged["tp_disagreements"] = [d for rank in out for d in rank["tp_disagreements"]]
            cache[layout] = (os.path.join(run_dir, "ckpt"), merged)
        return cache[layout]

    return get


def assert_same(ckpt, ref):
    assert set(ckpt.weights) == set(ref["weights"]) == set(ref["state"]) == set(ckpt.optimizer)
    for name, expected in ref["weights"].items():
        assert ckpt.weights[name].dtype == torch.float32, name
        assert torch.equal(ckpt.weights[name], expected), name
        assert set(ckpt.optimizer[name]) == set(ref["state"][name]), name
        for key, value in ref["state"][name].items():
            assert torch.equal(ckpt.optimizer[name][key], value), f"{name} {key}"


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_reader_reproduces_the_live_engine_exactly(trained, layout):
    from neox_sophia.convert.reader import read_checkpoint

    save_dir, ref = trained(layout)
    ckpt = read_checkpoint(save_dir)
    assert ckpt.tag == "global_step4" and ckpt.step == 4
    assert {key: value for key, value in ckpt.client_state.items() if key != "run"} == {
        "step": 4, "scheduler": {"num_iters": 4}, "nonfinite_steps": 0, "good_checkpoint": None,
        "data_position": 4 * 4 + (2 * 2 if layout != "adamw" else 0)}  # 4 batches of 4 (and 2 Hessian batches of 2)
    assert ckpt.client_state["run"]["train_iters"] == 4 and ckpt.client_state["run"]["train_batch_size"] == 4
    world = LAYOUTS[layout][0]
    assert ckpt.layout == {**LAYOUTS[layout][2], "world_size": world}
    assert ckpt.config["train_iters"] == 4 and ckpt.weights["embed_in.weight"].shape[0] == 512  # padding kept
    assert_same(ckpt, ref)
    keys = {"exp_avg", "hessian"} if layout != "adamw" else {"exp_avg", "exp_avg_sq"}
    assert all(set(entry) == keys for entry in ckpt.optimizer.values())
    if layout != "adamw":  # refreshed at steps 2 and 4, so no parameter's Hessian is still all zeros
        assert all(entry["hessian"].abs().max() > 0 for entry in ckpt.optimizer.values())
        assert {g["bs"] for g in ckpt.param_groups} == {2 * 32}  # the Hessian batch: 2 sequences of 32
    if layout == "bf16":  # the module's bf16 weights are the fp32 masters rounded
        for name, w in ckpt.weights.items():
            assert torch.equal(w.to(torch.bfloat16), ref["module"][name]), name
    else:
        for name, w in ckpt.weights.items():
            assert torch.equal(w, ref["module"][name]), name


@pytest.mark.parametrize("layout", ["tp2", "tp2-pp2-zero1"])
def test_tensor_parallel_dim_agrees_with_mark_tensor_parallel(trained, layout):
    from neox_sophia.model.layers import tensor_parallel_dim

    assert trained(layout)[1]["tp_disagreements"] == []
    assert tensor_parallel_dim("layers.7.attention.dense.bias") is None  # row-parallel bias: replicated
    assert tensor_parallel_dim("layers.7.attention.dense.weight") == 1
    assert tensor_parallel_dim("embed_out.weight") == tensor_parallel_dim("embed_in.weight") == 0


def test_universal_round_trip_is_exact_and_written_whole(trained, tmp_path):
    from neox_sophia.convert.reader import read_checkpoint
    from neox_sophia.convert.universal import load_universal, save_universal
    from neox_sophia.training.checkpoint import is_universal

    save_dir, ref = trained("tp2-pp2-zero1")
    ckpt = read_checkpoint(save_dir)
    out = tmp_path / "universal"
    save_universal(str(out), ckpt)
    assert sorted(os.listdir(tmp_path)) == ["universal"]  # no temporary directory left behind
    assert sorted(os.listdir(out)) == ["config.yml", "meta.json", "model.safetensors", "optimizer.safetensors"]
    assert is_universal(str(out))
    meta = json.loads((out / "meta.json").read_text())
    assert meta["format"] == "neox-sophia-universal" and meta["version"] == 1 and meta["step"] == 4
    assert meta["source_layout"]["tp"] == 2 and meta["source_layout"]["pp"] == 2
    assert meta["optimizer"]["type"] == "sophia" and meta["optimizer"]["state_keys"] == ["exp_avg", "hessian"]
    assert meta["client_state"]["scheduler"] == {"num_iters": 4} and meta["padded_vocab_size"] == 512
    back = load_universal(str(out))
    assert (back.step, back.tag, back.layout, back.client_state, back.config) == \
        (ckpt.step, ckpt.tag, ckpt.layout, ckpt.client_state, ckpt.config)
    assert list(back.weights) == list(ckpt.weights)  # model order survives safetensors' sorted keys
    assert_same(back, ref)

    with pytest.raises(FileExistsError, match="overwrite"):
        save_universal(str(out), ckpt)
    weights_only = read_checkpoint(save_dir, optimizer_state=False)
    assert weights_only.optimizer == {}
    save_universal(str(out), weights_only, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["universal"]
    replaced = load_universal(str(out))
    assert replaced.optimizer == {} and all(torch.equal(replaced.weights[n], w) for n, w in ckpt.weights.items())


def test_summarize_reports_layout_shapes_and_sophia_state(trained, tmp_path):
    from neox_sophia.config import config_from_values
    from neox_sophia.convert.reader import read_checkpoint
    from neox_sophia.convert.summary import render, summarize
    from neox_sophia.convert.universal import save_universal

    save_dir, _ = trained("dp2-zero1")
    ckpt = read_checkpoint(save_dir)
    summary = summarize(save_dir)
    json.dumps(summary)  # JSON-able, for `inspect --json`
    assert summary["step"] == 4 and summary["layout"]["dp"] == 2 and summary["layout"]["zero_stage"] == 1
    assert summary["model"]["num_layers"] == 2 and summary["model"]["padded_vocab_size"] == 512
    assert summary["optimizer"]["type"] == "sophia" and summary["nonfinite_steps"] == 0
    rows = {r["name"]: r for r in summary["tensors"]}
    assert list(rows) == list(ckpt.weights)
    assert rows["layers.1.mlp.dense_4h_to_h.weight"] == {"name": "layers.1.mlp.dense_4h_to_h.weight",
                                                        "shape": [64, 256], "dtype": "float32", "numel": 64 * 256}
    assert summary["model"]["parameters"] == sum(w.numel() for w in ckpt.weights.values())

    m = torch.cat([e["exp_avg"].reshape(-1) for e in ckpt.optimizer.values()])
    h = torch.cat([e["hessian"].reshape(-1) for e in ckpt.optimizer.values()])
    assert summary["state"]["exp_avg"]["norm"] == pytest.approx(float(m.double().norm()), rel=1e-9)
    assert summary["state"]["hessian"]["max"] == float(h.max()) and summary["state"]["hessian"]["min"] == 0.0
    assert summary["hessian"]["zero_fraction"] == pytest.approx(float((h == 0).double().mean()))
    assert summary["hessian"]["quantiles_exact"]
    assert summary["hessian"]["quantiles"]["0.5"] == pytest.approx(float(torch.quantile(h, 0.5)), rel=1e-6)
    # Sophia's clip fraction as SophiaStatistics defines it: |m| >= rho*bs*h, bs = the Hessian batch's tokens
    cfg = config_from_values(dict(ckpt.config), {})
    rho, bs = cfg.optimizer.params.rho, cfg.hessian_tokens(2)
    assert summary["sophia"]["bs"] == bs == 64 and summary["sophia"]["rho"] == rho
    clipped = float((m.abs() >= rho * bs * h).double().mean())
    assert summary["sophia"]["clip_frac"] == pytest.approx(clipped) and 0 < clipped < 1
    # per parameter role: the same definitions over each role's parameters
    from neox_sophia.optim.groups import role_of

    for role, figures in summary["groups"].items():
        names = [n for n in ckpt.optimizer if role_of(n) == role]
        hr = torch.cat([ckpt.optimizer[n]["hessian"].reshape(-1) for n in names])
        mr = torch.cat([ckpt.optimizer[n]["exp_avg"].reshape(-1) for n in names])
        assert figures["numel"] == hr.numel()
        assert figures["hessian_zero_frac"] == pytest.approx(float((hr == 0).double().mean()))
        assert figures["hessian_mean"] == pytest.approx(float(hr.double().mean()), rel=1e-9)
        assert figures["win_rate"] == pytest.approx(float((mr.abs() < rho * bs * hr).double().mean()))
    assert set(summary["groups"]) == {"embedding", "output", "attention", "mlp", "norms_biases"}
    text = render(summary)
    assert "clip_frac" in text and "embed_in.weight" in text and "dp 2" in text

    universal = tmp_path / "u"
    save_universal(str(universal), ckpt)
    again = summarize(str(universal))
    assert again["kind"] == "universal" and again["tensors"] == summary["tensors"]
    assert again["sophia"] == summary["sophia"] and again["hessian"] == summary["hessian"]
    assert again["state"]["hessian"]["norm"] == pytest.approx(summary["state"]["hessian"]["norm"], rel=1e-12)


def _copy(save_dir, dest):
    shutil.copytree(save_dir, dest)
    return str(dest), os.path.join(str(dest), "global_step4")


def test_broken_checkpoints_raise_checkpoint_errors_naming_the_file(trained, tmp_path):
    from neox_sophia.convert.reader import read_checkpoint
    from neox_sophia.convert.summary import summarize
    from neox_sophia.convert.universal import load_universal, save_universal
    from neox_sophia.training.checkpoint import CheckpointError

    single, _ = trained("single")
    with pytest.raises(CheckpointError, match="no such directory"):
        read_checkpoint(str(tmp_path / "nope"))
    with pytest.raises(CheckpointError, match="global_step9: no such checkpoint; complete steps .*: 4"):
        read_checkpoint(single, step=9)

    unmarked, tag = _copy(single, tmp_path / "unmarked")
    os.remove(os.path.join(tag, "complete"))
    with pytest.raises(CheckpointError, match="global_step4 has no 'complete' marker"):
        read_checkpoint(unmarked)
    with pytest.raises(CheckpointError, match="global_step4: has no 'complete' marker"):
        read_checkpoint(unmarked, step=4)
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        summarize(unmarked)

    states = "mp_rank_00_model_states.pt"
    truncated, tag = _copy(single, tmp_path / "truncated")
    data = open(os.path.join(tag, states), "rb").read()
    with open(os.path.join(tag, states), "wb") as f:
        f.write(data[:len(data) // 2])
    with pytest.raises(CheckpointError, match=f"{states}: could not be read .*truncated"):
        read_checkpoint(truncated)

    garbage, tag = _copy(single, tmp_path / "garbage")
    with open(os.path.join(tag, states), "wb") as f:
        f.write(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=f"{states}: could not be read"):
        read_checkpoint(garbage)

    for name, text, error in (("yaml", "{a: [1,", "could not be read \\(ParserError: "),
                              ("list", "- 1\n", "is not a mapping"),
                              ("noconfig", None, "missing; the trainer writes it with every checkpoint")):
        damaged, tag = _copy(single, tmp_path / name)
        if text is None:
            os.remove(os.path.join(tag, "config.yml"))
        else:
            open(os.path.join(tag, "config.yml"), "w").write(text)
        with pytest.raises(CheckpointError, match=f"config.yml:? {error}"):
            read_checkpoint(damaged)

    zero1, _ = trained("dp2-zero1")
    missing, tag = _copy(zero1, tmp_path / "missing")
    os.remove(os.path.join(tag, "zero_pp_rank_1_mp_rank_00_optim_states.pt"))
    with pytest.raises(CheckpointError, match="zero_pp_rank_1_mp_rank_00_optim_states.pt: missing"):
        read_checkpoint(missing)

    def edited(name, **changes):
        directory, tag = _copy(single, tmp_path / name)
        path = os.path.join(tag, "config.yml")
        values = yaml.safe_load(open(path))
        values.update(changes)
        with open(path, "w") as f:
            yaml.safe_dump(values, f, sort_keys=False)
        return directory

    with pytest.raises(CheckpointError, match=r"embed_in.weight \[512, 64\] \(config: \[512, 128\]\).*do not "
                                              r"match its config.yml"):
        read_checkpoint(edited("wider", hidden_size=128))
    with pytest.raises(CheckpointError, match="tensor-parallel size 1 .* config.yml says 2"):
        read_checkpoint(edited("tp", model_parallel_size=2))
    with pytest.raises(CheckpointError, match="missing layers.2"):
        read_checkpoint(edited("deeper", num_layers=3))

    universal = tmp_path / "universal"
    save_universal(str(universal), read_checkpoint(single))
    with open(universal / "model.safetensors", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(CheckpointError, match="model.safetensors: could not be read"):
        load_universal(str(universal))
    (universal / "config.yml").write_text("{a: [1,")  # damaged: one line naming it, from reading and inspect alike
    for read in (load_universal, summarize):
        with pytest.raises(CheckpointError, match=r"config.yml could not be read \(ParserError: .*consolidate the "
                                                  r"checkpoint again"):
            read(str(universal))
    (universal / "meta.json").write_text('{"format": ')
    with pytest.raises(CheckpointError, match=r"meta.json could not be read \(JSONDecodeError: "):
        load_universal(str(universal))


# ------------------------------------------------------------------ the CLI: convert, inspect, load_for_inference
def _cli(*args):
    return cli(list(args))


@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_to_hf_from_a_tp2_or_pp2_checkpoint_reproduces_our_logits(trained, tmp_path, layout):
    """TP shards merged and pipeline stages joined by the reader, written as a Hugging Face folder:
    transformers' GPTNeoXForCausalLM gives the logits of our own model loaded from the same
    checkpoint (load_for_inference, one process), and of the live engine's weights."""
    from transformers import GPTNeoXForCausalLM

    from neox_sophia.inference import load_for_inference

    save_dir, ref = trained(layout)
    out = str(tmp_path / "hf")
    done = _cli("convert", "to-hf", "--checkpoint", save_dir, "--output", out)
    assert done.returncode == 0, done.stderr[-2000:]
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(out))
    tokens = torch.randint(0, 500, (2, 32), generator=torch.Generator().manual_seed(0))
    ours = load_for_inference(save_dir)
    assert ours.step == 4
    for name, w in ref["weights"].items():
        assert torch.equal(dict(ours.model.named_parameters())[_module_name(ours.model, name)], w), name
    theirs = GPTNeoXForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(tokens).logits, ours(tokens), rtol=1e-5, atol=1e-5)
    again = _cli("convert", "to-hf", "--checkpoint", save_dir, "--output", out)
    assert again.returncode == 2 and "--overwrite" in again.stderr  # never replaced unless asked


def _module_name(model, global_name):
    from neox_sophia.model.gpt_neox import global_named_parameters

    by_param = {id(p): n for n, p in model.named_parameters()}
    return next(by_param[id(p)] for n, p in global_named_parameters(model) if n == global_name)


def test_hf_to_ours_to_hf_is_identical_and_trains_on(trained, tmp_path, corpus):
    """from-hf writes a universal checkpoint at step 0 (fresh optimizer state) for the config's
    model; to-hf of it gives back the same tensors; `train` continues from it."""
    from safetensors.torch import load_file

    save_dir, _ = trained("tp2")
    first, universal, second = (str(tmp_path / n) for n in ("hf1", "universal", "hf2"))
    assert _cli("convert", "to-hf", "--checkpoint", save_dir, "--output", first).returncode == 0
    config = os.path.join(save_dir, "global_step4", "config.yml")
    done = _cli("convert", "from-hf", "--input", first, "--output", universal, "--config", config)
    assert done.returncode == 0, done.stderr[-2000:]
    assert _cli("convert", "to-hf", "--checkpoint", universal, "--output", second).returncode == 0
    a, b = load_file(os.path.join(first, "model.safetensors")), load_file(os.path.join(second, "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with open(os.path.join(first, "config.json")) as f1, open(os.path.join(second, "config.json")) as f2:
        assert json.load(f1) == json.load(f2)
    run_dir = str(tmp_path / "continued")
    sets = overrides(corpus, run_dir, train_iters=2, lr_decay_iters=2, eval_iters=0, load=universal)
    trained_on = _cli("train", QUICKSTART, *[a for s in sets for a in ("--set", s)])
    assert trained_on.returncode == 0, trained_on.stderr[-2000:]
    assert f"resumed from {universal} at step 0" in trained_on.stdout


def test_inspect_and_consolidate_on_the_command_line(trained, tmp_path):
    save_dir, _ = trained("tp2-pp2-zero1")
    shown = _cli("inspect", save_dir)
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert "tp 2" in shown.stdout and "clip_frac" in shown.stdout
    assert "layers.1.mlp.dense_4h_to_h.weight" in shown.stdout
    as_json = json.loads(_cli("inspect", save_dir, "--json").stdout)
    assert as_json["step"] == 4 and as_json["layout"]["pp"] == 2
    out = str(tmp_path / "universal")
    assert _cli("convert", "consolidate", "--checkpoint", save_dir, "--output", out).returncode == 0
    assert json.loads(_cli("inspect", out, "--json").stdout)["kind"] == "universal"
    missing = _cli("convert", "consolidate", "--checkpoint", str(tmp_path / "nope"), "--output", str(tmp_path / "x"))
    assert missing.returncode == 2 and "nope" in missing.stderr and "Traceback" not in missing.stderr
