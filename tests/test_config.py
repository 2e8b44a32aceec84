"""GPT-NeoX config loading: merging, dashes, duplicates, overrides, unknown and unsupported keys,
every derived value, and the optimizer block."""
import glob
import math
import os
import warnings

import pytest
import torch

from neox_sophia.config import ConfigError, IgnoredKeysWarning, load_config
from neox_sophia.config.keys import EXTENSIONS, IGNORABLE, NEOX_DEFAULTS
from neox_sophia.config.neox import KEY_SECTION
from neox_sophia.optim.factory import AdamWParams, SophiaParams, build_optimizer, parse_optimizer_block
from neox_sophia.optim.groups import ROLES, role_groups, role_of

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MODEL = """{
  "num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "seq_length": 32,
  "max_position_embeddings": 32, "pos_emb": "rotary", "no_weight_tying": true,
  "train_micro_batch_size_per_gpu": 4
}"""
SOPHIA = """{
  "optimizer": {"type": "sophia", "params": {"lr": 6.0e-4, "rho": 0.05}},
  "weight_decay": 0.2, "min_lr": 3.0e-5,
}"""


@pytest.fixture
def write(tmp_path):
    def write(name, text):
        path = tmp_path / name
        path.write_text(text)
        return str(path)
    return write


def load(*paths, overrides=()):
    with warnings.catch_warnings():
        warnings.simplefilter("error", IgnoredKeysWarning)  # tests below ask for warnings explicitly
        return load_config(paths, overrides)


def error_of(*paths, overrides=()) -> str:
    with pytest.raises(ConfigError) as info:
        load(*paths, overrides=overrides)
    return str(info.value)


# --- reading and merging -------------------------------------------------------------------------

def test_files_merge_and_dashes_equal_underscores(write):
    model = write("model.yml", MODEL.replace('"seq_length"', '"seq-length"'))
    opt = write("opt.yml", SOPHIA.replace('"min_lr"', '"min-lr"'))
    cfg = load(model, opt)
    assert cfg.model.seq_length == 32 and cfg.training.min_lr == 3e-5
    assert cfg.optimizer.type == "sophia" and cfg.optimizer.params.rho == 0.05
    assert cfg.origins["seq_length"] == model and cfg.origins["min_lr"] == opt
    # nested keys keep their spelling (NeoX normalizes only the top level)
    assert "min_lr" in cfg.values and "seq-length" not in cfg.values


@pytest.mark.parametrize("first,second", [("min_lr", "min_lr"), ("min-lr", "min_lr"), ("min_lr", "min-lr")])
def test_key_in_two_files_is_an_error_naming_both(write, first, second):
    a = write("a.yml", MODEL[:-1] + f', "{first}": 0.0}}')
    b = write("b.yml", f'{{"{second}": 1.0e-5}}')
    message = error_of(a, b)
    assert a in message and b in message and "duplicate" in message


def test_dash_and_underscore_twice_in_one_file_is_an_error(write):
    a = write("a.yml", MODEL[:-1] + ', "min_lr": 0.0, "min-lr": 0.1}')
    message = error_of(a)
    assert "min-lr" in message and "same file" in message


def test_literal_repeat_in_one_file_is_an_error(write):
    a = write("a.yml", MODEL[:-1] + ', "num_layers": 3}')
    message = error_of(a)
    assert a in message and "num_layers" in message and "twice" in message


def test_missing_file_and_non_mapping(write, tmp_path):
    assert "no such config file" in error_of(str(tmp_path / "nope.yml"))
    assert "mapping" in error_of(write("list.yml", "[1, 2]"))
    assert "not valid YAML" in error_of(write("bad.yml", "{a: [1,"))


def test_overrides_win_reach_nested_blocks_and_parse_yaml(write):
    model, opt = write("m.yml", MODEL), write("o.yml", SOPHIA)
    cfg = load(model, opt, overrides=["seq-length=16", "optimizer.params.lr=7.0e-4",
                                      "optimizer.params.betas=[0.9, 0.95]", "train_iters=100"])
    assert cfg.model.seq_length == 16 and cfg.training.train_iters == 100
    assert cfg.optimizer.params.lr == 7e-4 and cfg.optimizer.params.betas == [0.9, 0.95]
    assert cfg.optimizer.params.rho == 0.05  # the rest of the block is kept
    assert cfg.origins["seq_length"] == "--set seq-length=16"
    # YAML 1.1 reads 6e-4 (no dot) as a string; a float key takes the number it spells
    assert load(model, opt, overrides=["optimizer.params.lr=6e-4"]).optimizer.params.lr == 6e-4
    assert "KEY=VALUE" in error_of(model, opt, overrides=["train_iters"])
    assert "not a mapping" in error_of(model, opt, overrides=["seq_length.x=1"])


# --- key classification --------------------------------------------------------------------------

def test_unknown_key_suggests_the_closest(write):
    a = write("a.yml", MODEL[:-1] + ', "hiden_size": 64}')
    message = error_of(a)
    assert a in message and "hiden_size: unknown key" in message and "did you mean 'hidden_size'" in message


def test_unimplemented_neox_setting_is_an_error_but_its_default_is_accepted(write):
    a = write("a.yml", MODEL[:-1] + ', "sequence_parallel": true, "use_qk_layernorm": true}')
    message = error_of(a)
    assert "sequence_parallel: True is a GPT-NeoX setting" in message and "use_qk_layernorm" in message
    assert a in message
    load(write("b.yml", MODEL[:-1] + ', "sequence_parallel": false, "use_mup": false}'))


def test_ignorable_keys_are_listed_in_one_warning(write):
    a = write("a.yml", MODEL[:-1] + ', "bias_dropout_fusion": true, "wandb_init_all_ranks": true, '
                                    '"partition_activations": true}')
    with pytest.warns(IgnoredKeysWarning) as record:
        cfg = load_config([a])
    assert len(record) == 1
    text = str(record[0].message)
    for key in ("bias_dropout_fusion", "wandb_init_all_ranks", "partition_activations"):
        assert key in text
    assert set(cfg.ignored) == {"bias_dropout_fusion", "wandb_init_all_ranks", "partition_activations"}


def test_every_implemented_key_is_a_neox_key_or_a_listed_extension():
    assert set(KEY_SECTION) <= set(NEOX_DEFAULTS) | set(EXTENSIONS), set(KEY_SECTION) - set(NEOX_DEFAULTS)
    assert not set(EXTENSIONS) & set(NEOX_DEFAULTS)
    assert not set(KEY_SECTION) & set(IGNORABLE)


@pytest.mark.parametrize("extra,key", [
    ('"pos_emb": "alibi"', "pos_emb"),
    ('"norm": "scalenorm"', "norm"),
    ('"attention_config": [[["local"], 2]]', "attention_config"),
    ('"attention_config": [[["flash"], 3]]', "attention_config"),
    ('"init_method": "orthogonal"', "init_method"),
    ('"num_layers": "two"', "num_layers"),
    ('"hidden_size": 66', "hidden_size"),
    ('"model_parallel_size": 3', "num_attention_heads"),
    ('"zero_optimization": {"stage": 3}', "zero_optimization"),
    ('"pipe_parallel_size": 1, "zero_optimization": {"stage": 2}', "zero_optimization"),
    ('"precision": "fp16", "bf16": {"enabled": true}', "precision"),
    ('"precision": "fp8"', "precision"),
    ('"tokenizer_type": "WordPiece"', "tokenizer_type"),
    ('"data_impl": "cached"', "data_impl"),
    ('"split": "a,b"', "split"),
    ('"data_path": "x", "train_data_paths": ["a"], "valid_data_paths": ["b"], "test_data_paths": ["c"]', "data_path"),
    ('"train_data_paths": ["a"]', "train_data_paths"),
    ('"save": "ckpt"', "save"),
    ('"lr_decay_style": "step"', "lr_decay_style"),
    ('"warmup": 2', "warmup"),
    ('"launcher": "srun"', "launcher"),
    ('"min_lr": 1.0', "min_lr"),
    ('"optimizer": {"type": "lion", "params": {}}', "optimizer"),
    # non-finite numbers are refused where they are read, not after setup
    ('"optimizer": {"type": "sophia", "params": {"rho": .inf}}', "optimizer.params.rho: inf is not a finite"),
    ('"optimizer": {"type": "sophia", "params": {"lr": .nan}}', "optimizer.params.lr: nan is not a finite"),
    ('"optimizer": {"type": "sophia", "params": {"eps": "-inf"}}', "optimizer.params.eps: '-inf' is not a finite"),
    ('"weight_decay": .inf', "weight_decay: inf is not a finite"),
    ('"gradient_clipping": .nan', "gradient_clipping: nan is not a finite"),
])
def test_values_we_cannot_honour_are_errors_naming_key_and_file(write, extra, key):
    a = write("a.yml", MODEL[:-1] + ", " + extra + "}")
    message = error_of(a)
    assert key in message and a in message, message


def test_gradient_accumulation_default_is_derived_not_neox_one(write):
    """NeoX defaults gradient_accumulation_steps to 1, so tb=16, mb=4 fails there at dp=1."""
    a = write("a.yml", MODEL[:-1] + ', "train_batch_size": 16}')
    assert load(a).layout(1)[4:] == (16, 4, 4)


# --- derived values ------------------------------------------------------------------------------

@pytest.mark.parametrize("batch,world,expected", [
    ('"train_batch_size": 64, "train_micro_batch_size_per_gpu": 4', 8, (64, 4, 2)),
    ('"train_batch_size": 64, "gradient_accumulation_steps": 2', 8, (64, 4, 2)),
    ('"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2', 8, (64, 4, 2)),
    ('"train_batch_size": 64', 8, (64, 8, 1)),
    ('"train_micro_batch_size_per_gpu": 4', 8, (32, 4, 1)),
    ('"train_batch_size": 64, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2', 8, (64, 4, 2)),
])
def test_batch_triple_any_two_determine_the_third(write, batch, world, expected):
    model = MODEL.replace(',\n  "train_micro_batch_size_per_gpu": 4', "")
    cfg = load(write("a.yml", model[:-1] + ", " + batch + "}"))
    lay = cfg.layout(world)
    assert (lay.train_batch_size, lay.micro_batch_size, lay.gradient_accumulation_steps) == expected
    assert lay.dp == world


def test_batch_and_world_size_errors(write):
    model = MODEL.replace(',\n  "train_micro_batch_size_per_gpu": 4', "")
    cfg = load(write("a.yml", model[:-1] + ', "train_batch_size": 60, "train_micro_batch_size_per_gpu": 4}'))
    with pytest.raises(ConfigError, match="train_batch_size.*not divisible"):
        cfg.layout(2)  # 60 / (4 x 2)
    cfg = load(write("b.yml", model[:-1] + ', "model_parallel_size": 2, "train_batch_size": 8}'))
    with pytest.raises(ConfigError, match="world size 3 is not divisible"):
        cfg.layout(3)
    lay = cfg.layout(8)
    assert (lay.tp, lay.pp, lay.dp) == (2, 1, 4)
    cfg = load(write("c.yml", model[:-1] + ', "train_batch_size": 16, "train_micro_batch_size_per_gpu": 2, '
                                           '"gradient_accumulation_steps": 4}'))
    assert cfg.layout(2).dp == 2
    with pytest.raises(ConfigError, match="set only two of the three"):
        cfg.layout(1)
    with pytest.raises(ConfigError, match="not a multiple"):
        load(write("e.yml", model[:-1] + ', "train_batch_size": 8, "train_micro_batch_size_per_gpu": 2, '
                                         '"gradient_accumulation_steps": 3}'))
    with pytest.raises(ConfigError, match="train_batch_size or train_micro_batch_size_per_gpu"):
        load(write("d.yml", model))


@pytest.mark.parametrize("vocab,divisible,tp,expected", [
    (50257, 128, 1, 50304), (50277, 128, 1, 50304), (50277, 128, 2, 50432), (50304, 128, 1, 50304),
    (32000, 1, 1, 32000), (32001, 64, 4, 32256),
])
def test_padded_vocab_size(write, vocab, divisible, tp, expected):
    cfg = load(write("a.yml", MODEL[:-1] + f', "make_vocab_size_divisible_by": {divisible}, '
                                           f'"model_parallel_size": {tp}}}'))
    assert cfg.padded_vocab_size(vocab) == expected
    assert expected % (divisible * tp) == 0 and expected - vocab < divisible * tp


def test_deepspeed_config(write):
    model = write("m.yml", MODEL[:-1] + ', "gradient_clipping": 0.5, "steps_per_print": 7, '
                                        '"zero_optimization": {"stage": 1, "reduce_bucket_size": 500000000}, '
                                        '"fp16": {"fp16": true, "enabled": true, "loss_scale": 0, '
                                        '"initial_scale_power": 12}}')
    ds = load(model, write("o.yml", SOPHIA)).deepspeed_config(world_size=2)
    assert ds["train_batch_size"] == 8 and ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 1 and ds["gradient_clipping"] == 0.5
    assert ds["steps_per_print"] == 7 and ds["zero_allow_untested_optimizer"] is True
    assert ds["zero_optimization"] == {"stage": 1, "reduce_bucket_size": 500000000}
    assert ds["fp16"] == {"enabled": True, "loss_scale": 0, "initial_scale_power": 12}
    assert "bf16" not in ds and "optimizer" not in ds  # Sophia is a client optimizer

    bf16 = load(write("b.yml", MODEL[:-1] + ', "precision": "bfloat16", "deepspeed_extra_args": '
                                            '{"communication_data_type": "fp32"}}')).deepspeed_config()
    assert bf16["bf16"] == {"enabled": True} and bf16["zero_optimization"] == {"stage": 0}
    assert bf16["communication_data_type"] == "fp32"
    clash = write("c.yml", MODEL[:-1] + ', "deepspeed_extra_args": {"gradient_clipping": 2.0}}')
    assert "deepspeed_extra_args: 'gradient_clipping' bypasses" in error_of(clash)  # refused at load
    assert load(write("d.yml", MODEL)).engine.resolved_precision == "fp32"


def test_hessian_tokens_are_half_a_global_batch(write):
    cfg = load(write("a.yml", MODEL))  # 4 sequences per rank, no accumulation
    assert cfg.hessian_tokens(world_size=4) == 4 * 4 // 2 * 32


def neox_lr(n, lr, min_lr, warmup, decay, style):
    """GPT-NeoX AnnealingLR.get_lr written out (warmup counted in decay steps)."""
    w = warmup * decay
    if w > 0 and n <= w:
        return lr * max(1, n) / w
    n, e = min(n, decay) - w, decay - w
    value = {"linear": lr * (e - n) / e,
             "cosine": min_lr + (lr - min_lr) / 2 * (math.cos(math.pi * n / e) + 1),
             "exponential": lr * math.exp(-0.693 * n / e),
             "constant": lr}[style]
    return max(value, min_lr)


@pytest.mark.parametrize("style", ["cosine", "linear", "exponential", "constant"])
def test_lr_schedule_follows_neox(write, style):
    cfg = load(write("m.yml", MODEL[:-1] + f', "train_iters": 1000, "lr_decay_style": "{style}", "warmup": 0.02}}'),
               write("o.yml", SOPHIA))
    schedule = cfg.lr_schedule()
    assert schedule.warmup_iters == 20
    for n in (0, 1, 10, 20, 21, 500, 999, 1000, 1500):
        assert schedule.lr_at(n) == pytest.approx(neox_lr(n, 6e-4, 3e-5, 0.02, 1000, style), rel=1e-12)
    assert schedule.lr_at(20) == pytest.approx(6e-4)
    if style == "cosine":
        assert schedule.lr_at(1000) == pytest.approx(3e-5) and schedule.lr_at(5000) == pytest.approx(3e-5)
        assert schedule.lr_at(510) == pytest.approx((6e-4 + 3e-5) / 2)


def test_lr_decay_iters_and_fraction(write):
    base = MODEL[:-1] + ', "train_iters": 1000'
    assert load(write("a.yml", base + ', "lr_decay_iters": 800}')).training.decay_iters == 800
    assert load(write("b.yml", base + ', "lr_decay_fraction": 0.5}')).training.decay_iters == 500
    assert load(write("c.yml", base + "}")).training.decay_iters == 1000
    with pytest.raises(ConfigError, match="train_iters"):
        load(write("d.yml", MODEL)).lr_schedule()


def test_annealing_lr_drives_param_groups(write):
    from neox_sophia.optim.schedules import AnnealingLR

    cfg = load(write("m.yml", MODEL[:-1] + ', "train_iters": 100, "lr_decay_style": "cosine", "warmup": 0.1}'),
               write("o.yml", SOPHIA))
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=1.0)
    sched = AnnealingLR(opt, cfg.lr_schedule())
    for n in range(1, 30):
        sched.step()
        assert opt.param_groups[0]["lr"] == cfg.lr_schedule().lr_at(n)
    restored = AnnealingLR(opt, cfg.lr_schedule())
    restored.load_state_dict(sched.state_dict())
    assert restored.get_last_lr() == [cfg.lr_schedule().lr_at(29)]


# --- the optimizer block -------------------------------------------------------------------------

def test_optimizer_block_defaults_aliases_and_errors():
    name, params = parse_optimizer_block({"type": "Sophia", "params": {"lr": 2e-4, "hessian_interval": 5}})
    assert name == "sophia" and isinstance(params, SophiaParams)
    assert params == SophiaParams(lr=2e-4, hessian_interval=5)
    assert (params.betas, params.rho, params.eps, params.estimator, params.bs) == \
        ([0.965, 0.99], 0.04, 1e-15, "gnb", None)
    assert not params.hessian_bias_correction and params.hessian_floor == 0.0 and params.adamw_groups == []
    assert parse_optimizer_block({"type": "Adam", "params": {"lr": 6e-4}})[0] == "adamw"
    assert parse_optimizer_block(None) == ("adamw", AdamWParams(lr=1e-3, betas=[0.9, 0.999], eps=1e-8))
    assert parse_optimizer_block({"type": "sophia", "params": {"lr": "6e-4"}})[1].lr == 6e-4  # YAML 1.1 strings
    cases = [
        ({"type": "sopia", "params": {}}, "did you mean 'sophia'"),
        ({"type": "sophia", "params": {"rhoo": 0.1}}, "did you mean 'rho'"),
        ({"type": "adamw", "params": {"weight_decay": 0.1}}, "top-level key weight_decay"),
        ({"type": "sophia", "params": {"estimator": "exact"}}, "estimator"),
        ({"type": "sophia", "params": {"hessian_interval": 0}}, "hessian_interval"),
        ({"type": "sophia", "params": {"lr": -1.0}}, "lr"),
        ({"type": "sophia", "params": {"betas": [0.9]}}, "betas"),
        ({"type": "sophia", "params": {"rho": 0}}, "rho"),
        ({"type": "sophia", "params": {"rho": "fast"}}, "optimizer.params.rho: expected float"),
        ({"type": "sophia", "params": {"hessian_floor": -0.1}}, "hessian_floor"),
        ({"type": "sophia", "params": {"adamw_groups": ["embeddings"]}}, "adamw_groups"),
        ({"type": "sophia", "params": {"adamw_betas": [0.9, 1.0]}}, "adamw_betas"),
        ({"type": "sophia", "param": {}}, "unexpected entries"),
    ]
    for block, text in cases:
        with pytest.raises(ConfigError, match=text):
            parse_optimizer_block(block)


def test_role_groups_and_build_optimizer():
    from neox_sophia.optim import Sophia

    names = ["embed_in.weight", "layers.0.input_layernorm.weight", "layers.0.input_layernorm.bias",
             "layers.0.attention.query_key_value.weight", "layers.0.attention.query_key_value.bias",
             "layers.0.attention.dense.weight", "layers.0.mlp.dense_h_to_4h.weight", "layers.0.mlp.dense_4h_to_h.bias",
             "final_layer_norm.weight", "embed_out.weight"]
    roles = ["embedding", "norms_biases", "norms_biases", "attention", "norms_biases", "attention", "mlp",
             "norms_biases", "norms_biases", "output"]
    assert [role_of(n) for n in names] == roles
    with pytest.raises(ValueError, match="no role"):
        role_of("0.weight")
    params = {n: torch.nn.Parameter(torch.zeros(2)) for n in names}
    groups = role_groups(params.items(), 0.2)
    assert [g["name"] for g in groups] == list(ROLES)
    assert {g["name"]: g["weight_decay"] for g in groups} == {"embedding": 0.2, "output": 0.2, "attention": 0.2,
                                                              "mlp": 0.2, "norms_biases": 0.0}
    assert [id(p) for p in groups[2]["params"]] == [id(params[names[3]]), id(params[names[5]])]
    assert role_groups(params.items(), 0.2, embedding_weight_decay=False)[0]["weight_decay"] == 0.0
    opt = build_optimizer({"type": "sophia", "params": {"lr": 1e-3, "rho": 0.05}}, groups, bs=4096)
    assert isinstance(opt, Sophia)
    assert opt.param_groups[0]["bs"] == 4096 and opt.param_groups[0]["weight_decay"] == 0.2
    assert opt.param_groups[-1]["weight_decay"] == 0.0 and opt.param_groups[0]["rho"] == 0.05
    with pytest.raises(ConfigError, match="bs"):
        build_optimizer({"type": "sophia", "params": {}}, role_groups(params.items(), 0.1))
    adamw = build_optimizer({"type": "adam", "params": {"lr": 1e-3, "betas": [0.9, 0.95]}},
                            role_groups(params.items(), 0.1))
    assert isinstance(adamw, torch.optim.AdamW) and adamw.param_groups[0]["betas"] == (0.9, 0.95)
    # a split optimizer: AdamW on the named roles, at its own peak lr through lr_scale
    split = parse_optimizer_block({"type": "sophia", "params": {
        "lr": 1e-3, "adamw_groups": ["embedding", "norms_biases"], "adamw_lr": 4e-3}})[1]
    opt = split.build(role_groups(params.items(), 0.1, overrides=split.group_overrides()), 4096)
    rules = {g["name"]: (g["update"], g["lr_scale"], g["betas"]) for g in opt.param_groups}
    assert rules["embedding"] == ("adamw", 4.0, (0.9, 0.95)) and rules["norms_biases"][0] == "adamw"
    assert rules["attention"] == ("sophia", 1.0, (0.965, 0.99))


# --- upstream NeoX configs and ours --------------------------------------------------------------

UPSTREAM = sorted(glob.glob(os.path.join(ROOT, "tests", "fixtures", "gpt-neox", "**", "*.yml"), recursive=True))


@pytest.mark.parametrize("path", UPSTREAM, ids=[os.path.relpath(p, ROOT) for p in UPSTREAM])
def test_unmodified_upstream_neox_configs_load(path):
    if os.path.basename(path) == "local_setup.yml":
        pytest.skip("paths only; loaded together with 125M.yml below")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", IgnoredKeysWarning)
        cfg = load_config([path])
    lay = cfg.layout()
    assert lay.train_batch_size == lay.micro_batch_size * lay.gradient_accumulation_steps * lay.dp
    cfg.deepspeed_config()
    assert cfg.optimizer.type == "adamw"


def test_upstream_125m_with_local_setup():
    fixtures = os.path.join(ROOT, "tests", "fixtures", "gpt-neox")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", IgnoredKeysWarning)
        cfg = load_config([os.path.join(fixtures, "125M.yml"), os.path.join(fixtures, "local_setup.yml")])
    assert cfg.model.hidden_size == 768 and cfg.checkpoint.save and cfg.data.data_path


MODELS = ["125M", "355M", "770M", "1-5B", "6-6B"]


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("optimizer", ["sophia", "adamw"])
def test_our_configs_combine(model, optimizer):
    files = [os.path.join(ROOT, "configs", f) for f in (f"{model}.yml", f"{optimizer}.yml", "pile.yml",
                                                         "local_setup.yml")]
    cfg = load(*files)
    assert cfg.optimizer.type == optimizer and cfg.model.pos_emb == "rotary"
    assert cfg.data.tokenizer_type == "HFTokenizer"
    lay = cfg.layout(8)
    assert lay.train_batch_size == cfg.batch.train_batch_size
    cfg.deepspeed_config(8)
    cfg.lr_schedule()


def test_quickstart_config_is_self_contained():
    cfg = load(os.path.join(ROOT, "configs", "quickstart.yml"))
    assert cfg.optimizer.type == "sophia" and cfg.training.train_iters
    assert cfg.parallel.pipe_parallel_size == 0 and cfg.engine.resolved_precision == "fp32"


def test_hessian_batch_is_the_same_global_sequences_at_every_layout(write):
    """H is global sequences (half a training batch by default, as the paper's 240 of 480), laid
    out in training micro-batches: ceil(H / (micro x DP)) per rank, the rows past H padding."""
    base = MODEL.replace(',\n  "train_micro_batch_size_per_gpu": 4', "")[:-1]
    cfg = load(write("a.yml", base + ', "train_batch_size": 16, "train_micro_batch_size_per_gpu": 2}'),
               write("o.yml", SOPHIA))
    assert [cfg.hessian_batch(world_size=w) for w in (1, 2, 4, 8)] == [(8, 4), (8, 2), (8, 1), (8, 1)]
    assert {cfg.hessian_tokens(world_size=w) for w in (1, 2, 4, 8)} == {8 * 32}
    one = load(write("b.yml", base + ', "train_batch_size": 3}'), write("p.yml", SOPHIA))
    assert one.hessian_batch(world_size=1) == (1, 1)  # at least one sequence
    sized = load(write("c.yml", base + ', "train_batch_size": 16, "train_micro_batch_size_per_gpu": 2}'),
                 write("q.yml", SOPHIA), overrides=["optimizer.params.hessian_batch_size=12"])
    assert [sized.hessian_batch(world_size=w) for w in (1, 2, 4)] == [(12, 6), (12, 3), (12, 2)]


def test_every_model_choice_the_config_accepts_has_an_implementation():
    """config.model names what the model keys may say; the model implements each name."""
    from neox_sophia.config.model import ACTIVATION_CHOICES, GATED_HF_ACT, NORM_CHOICES
    from neox_sophia.model.components import ACTIVATIONS, GATED_ACTIVATIONS, NORMS

    assert set(NORM_CHOICES) == set(NORMS)
    assert set(ACTIVATION_CHOICES) == set(ACTIVATIONS)
    assert set(GATED_HF_ACT) == set(GATED_ACTIVATIONS)
