"""The llama, llama2, mistral and llemma configs of gpt-neox (tests/fixtures/upstream, unmodified):
every model key they set is implemented, `plan` counts the published models' parameters, and
one file per family trains with Sophia on CPU at a reduced size and exports to Hugging Face
with our logits.

Only the model and parallel keys of each file are read here (the files' training, data and
tokenizer keys are the config loader's business, tested with the loader). Published sizes:
LLaMA-7B 6,738,415,616 and LLaMA-2-70B 68,976,648,192 parameters (32000-token vocabulary),
Mistral-7B 7,241,732,096 once its intermediate_size is given in NeoX's count (see below); each
with use_bias_in_mlp: false, which only the llama/ files set.
"""
import glob
import json
import os

import pytest
import torch

from neox_sophia.config import load_config
from neox_sophia.config.base import ConfigError
from neox_sophia.config.loader import read_config_files
from neox_sophia.config.neox import KEY_SECTION
from tests.distributed import run_ranks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UPSTREAM = os.path.join(ROOT, "tests", "fixtures", "upstream", "gpt-neox")
MODEL_FILES = sorted(p for family in ("llama", "llama2", "mistral", "llemma")
                     for p in glob.glob(os.path.join(UPSTREAM, family, "*.yml")) if not p.endswith("train_config.yml"))
CPU_BASE = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "train_iters": 3,
            "lr_decay_iters": 3, "precision": "fp32", "zero_optimization": {"stage": 0}, "eval_iters": 0,
            "log_interval": 1, "seed": 3,
            "optimizer": {"type": "sophia", "params": {"lr": 1.0e-3, "hessian_interval": 2}}}
MISTRAL_FIX = {"intermediate_size": 43008}  # NeoX's count for Mistral-7B's 14336 (the published 14336 is refused)


def model_keys(path):
    """The keys of an upstream file that describe the model and its parallel layout."""
    values = read_config_files([path])[0]
    return {k: v for k, v in values.items() if KEY_SECTION.get(k) in ("model", "parallel")}


def config_of(path, tmp_path, **changes):
    base = {**CPU_BASE, **{k: v for k, v in changes.items() if KEY_SECTION.get(k) not in ("model", "parallel")}}
    keys = {**model_keys(path), **{k: v for k, v in changes.items() if KEY_SECTION.get(k) in ("model", "parallel")}}
    files = []
    for name, values in (("model.yml", keys), ("cpu.yml", base)):
        files.append(str(tmp_path / name))
        with open(files[-1], "w") as f:
            json.dump(values, f)
    return load_config(files, warn=False)


def llama_parameters(layers, hidden, heads, kv_heads, ffn, vocab, mlp_biases):
    """Closed form: untied embeddings, per layer q/o h^2 each, k/v h x kv_heads x head_dim each, a
    three-matrix MLP (with biases: 2 ffn + h), two RMSNorm weights; the final RMSNorm."""
    head_dim = hidden // heads
    per_layer = 2 * hidden * hidden + 2 * hidden * kv_heads * head_dim + 3 * hidden * ffn + 2 * hidden
    per_layer += (2 * ffn + hidden) if mlp_biases else 0
    return layers * per_layer + 2 * vocab * hidden + hidden


@pytest.mark.parametrize("path", MODEL_FILES, ids=[os.path.relpath(p, UPSTREAM) for p in MODEL_FILES])
def test_every_model_key_is_implemented_and_plan_counts_the_parameters(path, tmp_path):
    from neox_sophia.plan import plan_config

    changes = MISTRAL_FIX if "mistral" in path else {}
    cfg = config_of(path, tmp_path, global_num_gpus=cfg_world(path), **changes)
    m = cfg.model
    assert m.norm == "rmsnorm" and m.activation == "swiglu" and m.no_weight_tying
    result = plan_config(cfg, vocab_size=32000)
    assert result["parameters"] == llama_parameters(m.num_layers, m.hidden_size, m.num_attention_heads, m.kv_heads,
                                                    m.ffn_hidden_size, 32000, m.use_bias_in_mlp)
    # only llama/ sets use_bias_in_mlp: false; NeoX's default (true) gives the others MLP biases
    # the published models do not have
    assert m.use_bias_in_mlp == ("/llama/" not in path)
    published = {"llama/7B.yml": 6_738_415_616, "llama2/70B.yml": 68_976_648_192, "mistral/7B.yml": 7_241_732_096}
    name = os.path.relpath(path, UPSTREAM)
    if name in published:
        unbiased = config_of(path, tmp_path, global_num_gpus=cfg_world(path), use_bias_in_mlp=False, **changes)
        assert plan_config(unbiased, vocab_size=32000)["parameters"] == published[name]


def cfg_world(path):
    keys = model_keys(path)
    return keys.get("model_parallel_size", 1) * max(keys.get("pipe_parallel_size", 0), 1)


def test_mistral_as_published_is_refused_with_the_fix(tmp_path):
    with pytest.raises(ConfigError, match=r"intermediate_size: 14336 .* NeoX cannot run either; .* set "
                                          r"intermediate_size: 43008$"):
        config_of(os.path.join(UPSTREAM, "mistral", "7B.yml"), tmp_path)


# one file per family, at a reduced size; the window must matter at this sequence length
FAMILIES = {"llama/7B.yml": {}, "llama2/70B.yml": {"num_kv_heads": 2}, "llemma/7B.yml": {},
            # Mistral-7B has no biases, and MistralForCausalLM none to export them to
            "mistral/7B.yml": {"num_kv_heads": 2, "sliding_window_width": 8, "intermediate_size": 384,
                               "use_bias_in_mlp": False}}
REDUCED = {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "intermediate_size": 768,
           "seq_length": 32, "max_position_embeddings": 64, "model_parallel_size": 1,
           "attention_config": [[["flash"], 2]]}


def family_worker(rank, world_size, runs):
    from neox_sophia.model.gpt_neox import full_state_dict
    from neox_sophia.training.loop import setup, train_loop

    out = {}
    for name, files in runs.items():  # one process, one family after another
        run = setup(load_config(files, warn=False))
        result = train_loop(run)
        out[name] = {"loss": result.train_loss, "hessian_updates": result.hessian_updates,
                     "weights": full_state_dict(run.engine.module), "pipeline": run.pipeline}
    return out


@pytest.mark.distributed
def test_one_config_per_family_trains_with_sophia_and_exports_to_hugging_face(corpus, tmp_path):
    from neox_sophia.convert.hf import to_hf
    from neox_sophia.model.gpt_neox import GPTNeoX
    from neox_sophia.parallel.topology import initialize_model_parallel

    transformers = pytest.importorskip("transformers")
    data = {"data_path": corpus.data_prefix, "vocab_file": corpus.tokenizer, "tokenizer_type": "HFTokenizer"}
    configs, runs = {}, {}
    for name, changes in FAMILIES.items():
        directory = tmp_path / name.replace("/", "-")
        directory.mkdir()
        configs[name] = config_of(os.path.join(UPSTREAM, name), directory, **{**REDUCED, **changes, **data})
        runs[name] = [str(directory / "model.yml"), str(directory / "cpu.yml")]
    out = run_ranks(family_worker, 1, args=(runs,))[0]
    x = torch.randint(0, 500, (2, 32), generator=torch.Generator().manual_seed(0))
    for name, cfg in configs.items():
        got = out[name]
        assert sorted(got["loss"]) == [1, 2, 3] and got["hessian_updates"] == 1, name
        assert all(torch.isfinite(torch.tensor(list(got["loss"].values())))), name
        assert got["pipeline"] == (cfg.parallel.pipe_parallel_size >= 1)  # the llama files use the PipelineEngine
        padded = got["weights"]["embed_in.weight"].shape[0]
        ours = GPTNeoX(cfg.model, padded, initialize_model_parallel(1, 1), seed=0).eval()
        with torch.no_grad():
            for param_name, param in ours.global_named_parameters():
                param.copy_(got["weights"][param_name])
        hf = transformers.AutoModelForCausalLM.from_pretrained(to_hf(got["weights"], cfg.model, padded,
                                                                     str(tmp_path / f"hf-{name.replace('/', '-')}")))
        expected = "MistralForCausalLM" if "mistral" in name else "LlamaForCausalLM"
        assert type(hf).__name__ == expected, name
        torch.testing.assert_close(hf.eval()(x).logits, ours.full_logits(x), rtol=0, atol=1e-5, msg=name)


@pytest.mark.parametrize("change,key", [({"moe_num_experts": 8}, "moe_num_experts"), ({"te_mha": True}, "te_mha"),
                                        ({"attention_config": [[["mamba"], 32]]}, "attention_config"),
                                        ({"attention_config": [[["rwkv"], 32]]}, "attention_config"),
                                        ({"norm": "scalenorm"}, "norm"), ({"activation": "relu"}, "activation")])
def test_moe_mamba_rwkv_and_transformer_engine_stay_refused_in_one_line(change, key, tmp_path):
    path = os.path.join(UPSTREAM, "llama", "7B.yml")
    with pytest.raises(ConfigError) as err:
        config_of(path, tmp_path, **change)
    message = str(err.value)
    assert "\n" not in message and f": {key}: " in message, message
