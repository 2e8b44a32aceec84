"""Every published config of gpt-neox (configs/, configs/pythia/ and the rest) and of
EleutherAI/pythia (models/), as a NeoX user hands it over (tests/fixtures/upstream/): each one
plans with the right parameter count and switches to Sophia with `--override configs/sophia.yml`,
or is refused in one line for the reason stated here, or is a companion file (paths, cluster,
logging) that loads next to a model file. One or two per family also train a few steps on CPU at
a reduced size, switched to Sophia (and one to AdamW) the documented way."""
import glob
import json
import os
import subprocess
import sys
import warnings

import pytest

from neox_sophia.config import ConfigError, IgnoredKeysWarning, load_config
from neox_sophia.plan import plan_config
from neox_sophia.training.preflight import refuse_untrainable
from tests.distributed import run_ranks
from tests.helpers import ROOT, launcher_free_env, neox_parameters

UPSTREAM = os.path.join(ROOT, "tests", "fixtures", "upstream")
SOPHIA, ADAMW = (os.path.join(ROOT, "configs", f"{name}.yml") for name in ("sophia", "adamw"))

PLAN, COMPANION = "plan", "companion"
FP16_AT_STAGE_0 = "zero_optimization: fp16 needs ZeRO stage 1 or 2 with this DeepSpeed"
LLAMA_TRAIN_CONFIG = "gpt-neox/llama/train_config.yml"
PLAN_WITH_LLAMA_TRAIN_CONFIG = "plan with llama/train_config.yml"  # the llama files' batch and schedule live there
NOT_SOFTMAX_ATTENTION = "attention_config: layer type(s)"
# file -> PLAN, COMPANION, or the start of its one-line refusal (after "FILE: ")
EXPECTED = {
    "gpt-neox/125M.yml": PLAN, "gpt-neox/125M-json.yml": PLAN, "gpt-neox/19M.yml": PLAN,
    "gpt-neox/49M.yml": PLAN, "gpt-neox/350M.yml": PLAN, "gpt-neox/760M.yml": PLAN, "gpt-neox/800M.yml": PLAN,
    "gpt-neox/1-3B.yml": PLAN, "gpt-neox/2-7B.yml": PLAN, "gpt-neox/6-7B.yml": PLAN, "gpt-neox/13B.yml": PLAN,
    "gpt-neox/20B.yml": PLAN, "gpt-neox/175B.yml": PLAN, "gpt-neox/bf16_125M.yml": PLAN,
    "gpt-neox/slurm_125M.yml": FP16_AT_STAGE_0,
    "gpt-neox/1-3B-transformer-engine.yml": "te_layernorm_mlp: True is a GPT-NeoX setting this project does not "
                                            "implement",
    "gpt-neox/125M-dmoe.yml": "moe_num_experts: 8 is a GPT-NeoX setting this project does not implement",
    "gpt-neox/bnb_125M.yml": "use_bnb_optimizer: True is a GPT-NeoX setting this project does not implement",
    "gpt-neox/gmlp_small.yml": NOT_SOFTMAX_ATTENTION,
    "gpt-neox/sparse.yml": "sparsity_config: {'block': 16, 'num_local_blocks': 32} is a GPT-NeoX setting",
    # a NeoX finetuning file that asks not to restore the fp32 master weights of its source
    "gpt-neox/finetuning_configs/6-9B.yml": "zero_optimization: load_from_fp32_weights: False is not supported",
    **{f"gpt-neox/mamba/mamba-{size}.yml": NOT_SOFTMAX_ATTENTION for size in ("130M", "370M", "790M", "1.4B", "2.8B")},
    "gpt-neox/rwkv/170M.yml": NOT_SOFTMAX_ATTENTION,
    **{f"gpt-neox/{name}.yml": PLAN_WITH_LLAMA_TRAIN_CONFIG for name in (
        "llama/7B", "llama/13B", "llama/30B", "llama/65B", "llama2/7B", "llama2/13B", "llama2/70B",
        "llama2/codellama_7B", "llama2/codellama_34B")},
    # as published, NeoX itself could not build this MLP; the refusal names intermediate_size: 43008
    "gpt-neox/mistral/7B.yml": "intermediate_size: 14336 with activation swiglu",
    **{f"gpt-neox/llemma/{size}.yml": "data_types: {'grad_accum_dtype': 'fp32'} is a GPT-NeoX setting"
       for size in ("7B", "34B")},
    LLAMA_TRAIN_CONFIG: COMPANION,  # loaded next to a llama model file
    **{f"gpt-neox/pythia/{size}.yml": PLAN for size in ("70M", "160M", "410M", "1-4B", "2-8B", "6-9B", "12B")},
    **{f"gpt-neox/pythia/{size}.yml": FP16_AT_STAGE_0 for size in ("14M", "31M", "1B")},
    **{f"pythia/{size}/pythia-{name}{dedup}.yml": PLAN
       for size, name in (("70M", "70m"), ("160M", "160m"), ("410M", "410m"), ("1B", "1b"), ("1.4B", "1.4b"),
                          ("2.8B", "2.8b"), ("6.9B", "6.9b")) for dedup in ("", "-deduped")},
    "pythia/14M/pythia-14m.yml": FP16_AT_STAGE_0, "pythia/31M/pythia-31m.yml": FP16_AT_STAGE_0,
    "pythia/12B/pythia-12b.yml": "not valid YAML: line 21 column 4: expected ',' or '}'",  # a comma missing
    "pythia/12B/pythia-12b-deduped.yml": "hidden_size: 5120 is not divisible by num_attention_heads 36",  # swapped
    **{f"gpt-neox/{name}": COMPANION for name in (
        "local_setup.yml", "local_setup_comet.yml", "local_setup_wandb.yml", "cpu_mock_config.yml", "prof.yml",
        "docker/pythia-paths.yml", "eleutherai_cluster.yml", "slurm_local.yml", "slurm_local.json",
        "text_generation.yml")},
}
# Total parameters less the input and output embeddings, from the Pythia paper (Biderman et al.
# 2023, Table 1): an independent check of the closed form for the Pythia shapes.
# (layers, hidden) -> count
PYTHIA_NON_EMBEDDING = {(6, 512): 18_915_328, (12, 768): 85_056_000, (24, 1024): 302_311_424,
                        (16, 2048): 805_736_448, (24, 2048): 1_208_602_624, (32, 2560): 2_517_652_480,
                        (32, 4096): 6_444_163_072, (36, 5120): 11_327_027_200}


def path_of(name):
    return os.path.join(UPSTREAM, name)


def load(paths, overrides=(), override_files=()):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", IgnoredKeysWarning)
        return load_config([path_of(p) if not os.path.isabs(p) else p for p in paths], overrides,
                           override_files=override_files)


def test_every_upstream_file_has_an_expected_outcome():
    files = {os.path.relpath(p, UPSTREAM) for p in glob.glob(os.path.join(UPSTREAM, "**", "*.*"), recursive=True)
             if os.path.isfile(p)}
    assert files - {"README.md"} == set(EXPECTED)


def planned(paths, overrides=()):
    cfg = load(paths, overrides, override_files=[SOPHIA])
    refuse_untrainable(cfg, cfg.layout().world_size)
    return cfg, plan_config(cfg)


@pytest.mark.parametrize("name", [n for n, e in EXPECTED.items() if e == PLAN])
def test_plans_with_the_right_count_and_switches_to_sophia(name):
    published = load([name])
    cfg, result = planned([name])
    assert published.optimizer.type == "adamw" and cfg.optimizer.type == "sophia"  # NeoX's Adam is AdamW here
    assert (cfg.optimizer.weight_decay, cfg.training.min_lr) == (0.2, 3.0e-5)
    m = cfg.model
    assert result["parameters"] == neox_parameters(m.num_layers, m.hidden_size, result["padded_vocab_size"],
                                                   tied=not m.no_weight_tying, ffn=m.intermediate_size)
    if "pythia" in name:
        non_embedding = result["parameters"] - 2 * result["padded_vocab_size"] * m.hidden_size
        assert non_embedding == PYTHIA_NON_EMBEDDING[m.num_layers, m.hidden_size]


@pytest.mark.parametrize("name", [n for n, e in EXPECTED.items() if e == PLAN_WITH_LLAMA_TRAIN_CONFIG])
def test_llama_family_plans_next_to_its_train_config_and_switches_to_sophia(name):
    """The parameter counts of these shapes are checked against the published models in
    tests/test_llama_family.py."""
    cfg, result = planned([name, LLAMA_TRAIN_CONFIG])
    assert cfg.optimizer.type == "sophia" and cfg.model.norm == "rmsnorm" and result["parameters"] > 4e9


@pytest.mark.parametrize("name", [n for n, e in EXPECTED.items() if e not in (PLAN, COMPANION,
                                                                                PLAN_WITH_LLAMA_TRAIN_CONFIG)])
def test_is_refused_in_one_line_for_the_stated_reason(name):
    with pytest.raises(ConfigError) as refused:
        cfg = load([name], override_files=[SOPHIA])
        refuse_untrainable(cfg, cfg.layout().world_size)
    lines = str(refused.value).splitlines()
    assert lines[0].startswith(f"{path_of(name)}: {EXPECTED[name]}"), lines[0]
    assert all(line.startswith(path_of(name) + ": ") for line in lines)  # one line per problem, each located


@pytest.mark.parametrize("name", [n for n, e in EXPECTED.items() if e == FP16_AT_STAGE_0])
def test_fp16_at_stage_0_plans_at_stage_1(name):
    cfg, result = planned([name], ["zero_optimization.stage=1"])
    assert cfg.optimizer.type == "sophia" and result["layout"]["zero_stage"] == 1


@pytest.mark.parametrize("name", [n for n, e in EXPECTED.items() if e == COMPANION])
def test_companion_files_load_next_to_a_model_file(name):
    model, hidden = ("gpt-neox/llama/7B.yml", 4096) if name == LLAMA_TRAIN_CONFIG else ("gpt-neox/125M.yml", 768)
    cfg = load([model, name], override_files=[SOPHIA])
    assert cfg.optimizer.type == "sophia" and cfg.model.hidden_size == hidden


# --- a few steps on CPU at a reduced size ------------------------------------------------------


def reduced(corpus, log_dir):
    """--set overrides that shrink a published config to a CPU-sized run on the built-in corpus."""
    values = {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "seq_length": 32,
              "max_position_embeddings": 32, "attention_config": None, "model_parallel_size": 1,
              "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "fp16.enabled": False,
              "train_iters": 4, "lr_decay_iters": 4, "eval_interval": 2, "eval_iters": 1, "log_interval": 1,
              "data_path": corpus.data_prefix, "train_data_paths": None, "valid_data_paths": None,
              "test_data_paths": None, "tokenizer_type": "HFTokenizer", "vocab_file": corpus.tokenizer,
              "merge_file": None, "save": None, "load": None, "extra_save_iters": None, "log_dir": log_dir}
    return [f"{k}={json.dumps(v)}" for k, v in values.items()]


def train_worker(rank, world_size, runs):
    from neox_sophia.training.loop import setup, train_loop

    results = []
    for paths, override_files, sets in runs:
        cfg = load(paths, sets, override_files)
        result = train_loop(setup(cfg))
        results.append({"optimizer": cfg.optimizer.type, "loss": result.train_loss, "val": result.val_loss,
                        "hessian_updates": result.hessian_updates})
    return results


@pytest.mark.distributed
def test_representatives_train_switched_to_sophia_and_adamw(corpus, tmp_path):
    sophia_k2 = ["optimizer.params.hessian_interval=2"]
    runs = [(["gpt-neox/pythia/70M.yml"], [SOPHIA], reduced(corpus, str(tmp_path / "a")) + sophia_k2),
            (["pythia/70M/pythia-70m-deduped.yml"], [SOPHIA], reduced(corpus, str(tmp_path / "b")) + sophia_k2),
            (["pythia/160M/pythia-160m.yml"], [ADAMW], reduced(corpus, str(tmp_path / "c")))]
    results = run_ranks(train_worker, 1, args=(runs,))[0]
    assert [r["optimizer"] for r in results] == ["sophia", "sophia", "adamw"]
    for r in results:
        assert sorted(r["loss"]) == [1, 2, 3, 4] and all(loss == loss and loss < 20 for loss in r["loss"].values())
        assert sorted(r["val"]) == [2, 4]
    assert [r["hessian_updates"] for r in results] == [2, 2, 0]


@pytest.mark.distributed
def test_the_flagship_trains_switched_to_sophia_from_the_command_line(corpus, tmp_path):
    """NeoX's configs/125M.yml (hostfile /mock_path, fp16 at ZeRO-1, pipe_parallel_size 1) named
    the deepy.py way, with --override configs/sophia.yml."""
    sets = reduced(corpus, str(tmp_path)) + ["optimizer.params.hessian_interval=2"]
    done = subprocess.run([sys.executable, "-m", "neox_sophia.cli", "train", "-d", os.path.join(UPSTREAM, "gpt-neox"),
                           "125M", "--override", SOPHIA] + [a for s in sets for a in ("--set", s)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT, stdin=subprocess.DEVNULL,
                          env=launcher_free_env())
    assert done.returncode == 0, done.stderr[-3000:]
    notes = [line for line in done.stderr.splitlines() if " replaces " in line]
    assert [n.split(":")[1].strip() for n in notes] == ["optimizer", "weight_decay", "min_lr"]
    metrics = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    steps = [m for m in metrics if "loss" in m]
    assert [m["step"] for m in steps] == [1, 2, 3, 4] and [m["hessian_update"] for m in steps] == [False, True] * 2
