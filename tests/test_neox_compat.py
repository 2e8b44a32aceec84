"""Coming from GPT-NeoX: the override file that switches an upstream config to Sophia or AdamW,
the older key names of published configs, deepy.py's config names, the DeepSpeed options that
pass, and `plan` refusing what `train` refuses (with JSON alone on stdout)."""
import json
import math
import os
import subprocess
import sys
import warnings

import pytest

from neox_sophia.cli import config_path, main
from neox_sophia.config import ConfigError, IgnoredKeysWarning, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UPSTREAM = os.path.join(ROOT, "tests", "fixtures", "upstream")
SOPHIA, ADAMW = (os.path.join(ROOT, "configs", f"{name}.yml") for name in ("sophia", "adamw"))
PYTHIA_70M = os.path.join(UPSTREAM, "pythia", "70M", "pythia-70m.yml")
MODEL = ('{"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "seq_length": 32, '
         '"max_position_embeddings": 32, "pos_emb": "rotary", "train_micro_batch_size_per_gpu": 4, '
         '"train_iters": 1000, "optimizer": {"type": "Adam", "params": {"lr": 1.0e-4}}')


@pytest.fixture
def write(tmp_path):
    def write(name, text):
        (tmp_path / name).write_text(text)
        return str(tmp_path / name)
    return write


def load(paths, overrides=(), override_files=()):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", IgnoredKeysWarning)
        return load_config(paths, overrides, override_files=override_files)


def refusal(paths, overrides=(), override_files=()) -> str:
    with pytest.raises(ConfigError) as info:
        load(paths, overrides, override_files)
    return str(info.value)


# --- the switch to Sophia (and to AdamW) -------------------------------------------------------


def test_an_override_file_switches_an_upstream_config_and_says_what_it_replaced():
    sophia = load([PYTHIA_70M], override_files=[SOPHIA])
    adamw = load([PYTHIA_70M], override_files=[ADAMW])
    assert sophia.optimizer.type == "sophia" and adamw.optimizer.type == "adamw"
    assert (sophia.optimizer.weight_decay, sophia.training.min_lr) == (0.2, 3.0e-5)
    assert (adamw.optimizer.weight_decay, adamw.optimizer.params.betas) == (0.1, [0.9, 0.95])
    assert sophia.values.keys() == adamw.values.keys()  # the two runs differ in that one file
    assert {k for k in sophia.values if sophia.values[k] != adamw.values[k]} == {"optimizer", "weight_decay"}
    replaced = [n for n in sophia.notes if "replaces" in n]
    assert replaced == [f"optimizer: {SOPHIA} replaces {{'type': 'Adam', 'params': {{'lr': 0.001, 'betas': "
                        f"[0.9, 0... from {PYTHIA_70M}",
                        f"weight_decay: {SOPHIA} replaces 0.1 from {PYTHIA_70M}",
                        f"min_lr: {SOPHIA} replaces 0.0001 from {PYTHIA_70M}"]
    assert sophia.origins["optimizer"] == SOPHIA and sophia.origins["seq_length"] == PYTHIA_70M


def test_without_the_flag_a_repeated_key_is_still_an_error_that_names_the_flag():
    message = refusal([PYTHIA_70M, SOPHIA])
    assert "optimizer: duplicate key" in message and f"--override {SOPHIA}" in message


def test_an_override_file_is_strict_itself_and_adds_new_keys_silently(write):
    model = write("m.yml", MODEL + "}")
    twice = write("twice.yml", '{"min_lr": 0.0, "min-lr": 1.0e-5}')
    assert "duplicate key" in refusal([model], override_files=[twice])
    extra = write("extra.yml", '{"seed": 7, "weight_decay": 0.0}')
    cfg = load([model], override_files=[extra])
    assert cfg.training.seed == 7 and cfg.optimizer.weight_decay == 0.0 and cfg.notes == []
    # later override files replace earlier ones the same way; --set comes last
    cfg = load([model], ["seed=9"], override_files=[extra, write("again.yml", '{"seed": 8}')])
    assert cfg.training.seed == 9 and cfg.notes == [f"seed: {os.path.dirname(model)}/again.yml replaces 7 from "
                                                   f"{os.path.dirname(model)}/extra.yml"]


# --- older key names of published configs ------------------------------------------------------


def test_pythias_gas_is_gradient_accumulation_steps_said_in_one_line(write):
    cfg = load([PYTHIA_70M])
    assert cfg.batch.gradient_accumulation_steps == 1 and "gas" not in cfg.values
    assert cfg.notes == [f"{PYTHIA_70M}: gas: read as gradient_accumulation_steps (NeoX's second name for it "
                         f"until Feb 2024, set by the Pythia configs)"]
    assert load([PYTHIA_70M], ["gas=4"]).batch.gradient_accumulation_steps == 4  # --set knows the alias too
    both = write("both.yml", MODEL + ', "gas": 2, "gradient_accumulation_steps": 2}')
    assert "gradient_accumulation_steps: duplicate key" in refusal([both])
    later = write("later.yml", '{"gradient_accumulation_steps": 2}')
    assert "duplicate key (already in" in refusal([PYTHIA_70M, later])


def test_save_interval_is_checkpoint_factor(write):
    cfg = load([write("s.yml", MODEL + ', "save": "ck", "save-interval": 50}')])
    assert cfg.checkpoint.checkpoint_factor == 50 and cfg.notes[0].endswith(
        "save_interval: read as checkpoint_factor (NeoX's name for it before Dec 2022)")


def llemma_lr(step, lr, decay_lr_to, warmup_iters, end):
    """The llemma branch's AnnealingLR (EleutherAI/gpt-neox before a55d69c4): warmup in steps,
    cosine from lr down to decay_lr_to x lr, clamped below at min_lr (0)."""
    if step <= warmup_iters:
        return lr * max(1, step) / warmup_iters
    n, half = step - warmup_iters, end - warmup_iters
    return lr * (decay_lr_to + (1 - decay_lr_to) * 0.5 * (math.cos(math.pi * n / half) + 1))


def test_llemmas_decay_lr_to_and_warmup_iters_give_its_schedule(write):
    path = write("l.yml", MODEL + ', "lr_decay_style": "cosine", "lr_decay_iters": 1000, "decay_lr_to": 0.033, '
                                  '"warmup_iters": 50}')
    cfg = load([path])
    assert cfg.training.min_lr == pytest.approx(0.033 * 1e-4, rel=1e-15) and cfg.training.warmup == 0.05
    assert cfg.notes == ["decay_lr_to: 0.033 read as min_lr = 3.3e-06 (the llemma branch's cosine floor as a "
                         "fraction of lr)",
                         "warmup_iters: 50 read as warmup = 0.05 (the llemma branch's warmup in steps)"]
    schedule = cfg.lr_schedule()
    for step in (0, 1, 25, 50, 51, 300, 999, 1000):
        assert schedule.lr_at(step) == pytest.approx(llemma_lr(step, 1e-4, 0.033, 50, 1000), rel=1e-12), step


def test_decay_lr_to_conflicts_and_replacements(write):
    base = MODEL + ', "lr_decay_style": "cosine", "decay_lr_to": 0.1'
    assert "decay_lr_to: sets min_lr, which" in refusal([write("a.yml", base + ', "min_lr": 0.0}')])
    assert "only defined for lr_decay_style cosine" in refusal([write("b.yml", MODEL + ', "decay_lr_to": 0.1}')])
    cfg = load([write("c.yml", base + "}")], override_files=[SOPHIA])  # sophia.yml's min_lr replaces it
    assert cfg.training.min_lr == 3.0e-5 and any(n.startswith(f"decay_lr_to: {SOPHIA} replaces 0.1") for n in cfg.notes)
    assert load([write("d.yml", base + "}")], ["min_lr=0.0"]).training.min_lr == 0.0
    floor = write("e.yml", MODEL + ', "lr_decay_style": "cosine", "min_lr": 0.0}')  # and the other way round
    assert load([floor], override_files=[write("f.yml", '{"decay_lr_to": 0.5}')]).training.min_lr == 0.5e-4
    assert load([floor], ["decay_lr_to=0.5"]).training.min_lr == 0.5e-4


def test_attention_type_is_what_num_kv_heads_implies(write):
    cfg = load([write("a.yml", MODEL + ', "attention_type": "multihead"}')])
    assert cfg.notes == ["attention_type: 'multihead' dropped (implied by num_kv_heads in current NeoX)"]
    grouped = write("b.yml", MODEL + ', "attention_type": "groupedquery"}')
    assert "does not match num_kv_heads None" in refusal([grouped])


# --- deepy.py's config names -------------------------------------------------------------------


def test_config_names_without_yml_under_a_config_folder():
    assert config_path("125M", "configs") == os.path.join("configs", "125M.yml")
    assert config_path("pythia/70M") == "pythia/70M.yml"
    assert config_path("slurm_local.json", "configs") == os.path.join("configs", "slurm_local.json")


def test_plan_takes_deepy_style_names(capsys):
    assert main(["plan", "--json", "-d", os.path.join(UPSTREAM, "gpt-neox"), "pythia/70M", "local_setup",
                 "--override", os.path.join(ROOT, "configs", "sophia")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["parameters"] == 70426624 and result["layout"]["optimizer"] == "sophia"  # Pythia-70M


# --- DeepSpeed options -------------------------------------------------------------------------


def engine(write, zero=None, extra=None):
    text = MODEL + (f', "zero_optimization": {json.dumps(zero)}' if zero is not None else "") \
        + (f', "deepspeed_extra_args": {json.dumps(extra)}' if extra is not None else "") + "}"
    return write("e.yml", text)


def test_cpu_offload_of_the_optimizer_state_reaches_deepspeed(write):
    ds = load([engine(write, {"stage": 2, "offload_optimizer": {"device": "cpu", "pin_memory": True}})]
              ).deepspeed_config()
    assert ds["zero_optimization"] == {"stage": 2, "offload_optimizer": {"device": "cpu", "pin_memory": True}}
    assert ds["zero_force_ds_cpu_optimizer"] is False  # DeepSpeed refuses a client optimizer otherwise
    legacy = load([engine(write, {"stage": 1, "cpu_offload": True})]).deepspeed_config()  # NeoX's older spelling
    assert legacy["zero_optimization"] == {"stage": 1, "offload_optimizer": {"device": "cpu"}}
    pythia = load([PYTHIA_70M]).deepspeed_config()  # "cpu_offload": false
    assert "cpu_offload" not in pythia["zero_optimization"] and "zero_force_ds_cpu_optimizer" not in pythia


@pytest.mark.parametrize("zero, extra, says", [
    ({"stage": 0, "offload_optimizer": {"device": "cpu"}}, None, "offload_optimizer: device 'cpu' needs stage 1 or 2"),
    ({"stage": 2, "offload_optimizer": {"device": "nvme"}}, None, "device 'nvme' is not supported"),
    ({"stage": 2, "offload_optimizer": {"device": "cpu", "ratio": 0.5}}, None, "['ratio'] not supported"),
    ({"stage": 1, "offload_param": {"device": "cpu"}}, None, "'offload_param' is not supported with Sophia"),
    ({"stage": 1, "stage3_max_live_parameters": 1}, None, "'stage3_max_live_parameters' is not supported"),
    ({"stage": 1, "compute_grad_norm": False}, None, "compute_grad_norm: False is not supported (gradient clipping"),
    ({"stage": 1, "cpu_offload": True, "offload_optimizer": {"device": "cpu"}}, None, "keep offload_optimizer"),
    (None, {"bf16": {"enabled": True}}, "'bf16' bypasses the config's own checks; set precision: bfloat16"),
    (None, {"optimizer": {"type": "Adam"}}, "'optimizer' bypasses"),
    (None, {"zero_force_ds_cpu_optimizer": False}, "'zero_force_ds_cpu_optimizer' is not supported"),
    (None, {"communication_data_type": "fp16"}, "only \"fp32\" passes"),
])
def test_other_engine_options_are_refused_in_one_line(write, zero, extra, says):
    message = refusal([engine(write, zero, extra)])
    assert says in message and "\n" not in message, message


def test_monitors_pass_through_deepspeed_extra_args(write):
    comms = {"enabled": True, "verbose": False}
    ds = load([engine(write, extra={"comms_logger": comms, "communication_data_type": "fp32"})]).deepspeed_config()
    assert ds["comms_logger"] == comms and ds["communication_data_type"] == "fp32"
    assert load([os.path.join(UPSTREAM, "gpt-neox", "19M.yml")]).deepspeed_config()["comms_logger"]["prof_all"]


# --- plan refuses what train refuses -----------------------------------------------------------


def cli(*args):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    return subprocess.run([sys.executable, "-m", "neox_sophia.cli", *args], capture_output=True, text=True,
                          timeout=300, env={**env, "DS_ACCELERATOR": "cpu"}, cwd=ROOT, stdin=subprocess.DEVNULL)


def refusal_line(stderr: str, command: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith(f"neox-sophia {command}: ")]
    assert len(lines) == 1, stderr
    return lines[0].split(": ", 1)[1]


@pytest.mark.distributed  # starts `neox-sophia train` in a subprocess
def test_plan_and_train_refuse_fp16_at_zero_stage_0_with_the_same_line(tmp_path):
    """NeoX's own pythia/14M.yml: fp16 at ZeRO stage 0, which this DeepSpeed mishandles."""
    config = os.path.join(UPSTREAM, "gpt-neox", "pythia", "14M.yml")
    plan = cli("plan", config)
    train = cli("train", config, "--set", "train_iters=1", "--set", f"log_dir={tmp_path}")
    assert plan.returncode == train.returncode == 2 and plan.stdout == ""
    said = refusal_line(plan.stderr, "plan")
    assert "zero_optimization: fp16 needs ZeRO stage 1 or 2" in said and said.startswith(config)
    assert refusal_line(train.stderr, "train") == said


def test_plan_json_is_the_only_thing_on_stdout_and_warnings_go_to_stderr():
    result = cli("plan", "--json", PYTHIA_70M, "--override", SOPHIA)
    assert result.returncode == 0
    plan = json.loads(result.stdout)  # nothing else on stdout (DeepSpeed logs there by default)
    assert plan["parameters"] == 70426624
    missing = ["data_path: /fsx/pile/pile_20B_tokenizer_text_document.bin/.idx not found here",
               "vocab_file: /fsx/pile/20B_tokenizer.json not found here"]
    assert plan["missing_for_training"] == missing
    assert [f"neox-sophia plan: warning: train would stop here: {m}" for m in missing] == \
        [line for line in result.stderr.splitlines() if "warning: train would stop" in line]


def test_gpt2_bpe_without_merge_file_is_one_line(write):
    setup = write("local.yml", '{"vocab_file": "data/gpt2-vocab.json"}')
    message = refusal([os.path.join(UPSTREAM, "gpt-neox", "125M.yml"), setup])
    assert message == (f"{setup}: merge_file: not set; GPT2BPETokenizer needs both vocab_file and merge_file "
                       f"(GPT-2's vocab.json and merges.txt)")


def test_a_broken_yaml_file_is_one_line():
    broken = os.path.join(UPSTREAM, "pythia", "12B", "pythia-12b.yml")  # a comma missing upstream
    assert refusal([broken]) == f"{broken}: not valid YAML: line 21 column 4: expected ',' or '}}', but got '<scalar>'"


# --- eval_iters counts what NeoX counts --------------------------------------------------------


def test_eval_iters_counts_batches_of_train_batch_size_as_neox(monkeypatch):
    """NeoX's evaluate(): eval_iters iterations of gradient_accumulation_steps micro-batches on
    every data-parallel rank, the validation iterator going on from pass to pass; its dataset
    holds (train_iters // eval_interval + 1) x eval_iters x train_batch_size samples."""
    import types

    import torch

    from neox_sophia.data import datasets
    from neox_sophia.training import loop

    cfg = load([os.path.join(ROOT, "configs", "quickstart.yml")],
               ["train_micro_batch_size_per_gpu=2", "gradient_accumulation_steps=3", "eval_iters=2",
                "train_iters=50", "eval_interval=20"])
    layout = cfg.layout(4)  # 4 data-parallel ranks: a batch is 2 x 3 x 4 = 24 sequences
    sample = {key: torch.zeros(8, dtype=torch.long) for key in ("tokens", "labels", "loss_mask")}
    seen = {}
    for rank in range(4):
        run = loop.Run(cfg, None, None, None, types.SimpleNamespace(dp_rank=rank), layout, 512, None,
                       [sample] * 200, torch.device("cpu"), schedule=None, hessian=None)
        for evaluation in (0, 1):
            batches = run.eval_micro_batches(evaluation)
            assert len(batches) == 2 * 3  # eval_iters x gradient_accumulation_steps per rank
            seen.setdefault(evaluation, []).extend(i for b in batches for i in b.indices)
    assert sorted(seen[0]) == list(range(48)) and sorted(seen[1]) == list(range(48, 96))  # 2 x 24 each
    asked = {}
    monkeypatch.setattr(datasets, "build_datasets", lambda data, **k: asked.update(k) or ("train", "valid", None))
    loop._datasets(cfg, layout, None, loop._sample_schedule(cfg, layout))
    assert asked["num_samples"][1] == (50 // 20 + 1) * 2 * 24


@pytest.mark.parametrize("env, printed", [({}, True), ({"RANK": "0"}, True), ({"RANK": "3"}, False),
                                          ({"OMPI_COMM_WORLD_RANK": "1"}, False), ({"SLURM_PROCID": "0"}, True)])
def test_config_notes_are_said_once_per_run(monkeypatch, capsys, env, printed):
    from neox_sophia.cli import print_notes

    for key in ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "SLURM_PROCID"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    print_notes(["gas: read as gradient_accumulation_steps"])
    assert capsys.readouterr().err == ("neox-sophia: gas: read as gradient_accumulation_steps\n" if printed else "")
