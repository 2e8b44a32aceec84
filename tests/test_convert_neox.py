"""GPT-NeoX's checkpoint layout (neox_sophia.convert.neox) against NeoX's own converters.

The NeoX side is restated here from EleutherAI/gpt-neox at ea7aefd8, independently of the code
under test:
- reading: tools/ckpts/convert_neox_to_hf.py (MODEL_KEYS "new", get_state, the TP merge:
  column-parallel cat dim 0, row-parallel cat dim 1, norms averaged, row-parallel biases summed,
  reshard_and_split_qkv for GQA, linear1 chunked [up | gate] per rank);
- writing: tools/ckpts/convert_hf_llama_to_neox.py (sequential.N keys, per-rank [q|k|v] and
  [up|gate], tag "0") and convert_hf_to_sequential.py's shard_sequential_mp (HF GPTNeoX layer
  names, row-parallel biases divided by TP).
Both directions at TP=1 and TP=2, sequential (mp_rank files) and pipelined (layer files); the
check is the logits of the Hugging Face model against ours on the same weights.
"""
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from neox_sophia.config.model import ModelConfig
from neox_sophia.convert.hf import hf_config
from neox_sophia.convert.neox import (fit_vocab, is_neox_checkpoint, neox_padded_vocab, read_neox, save_neox)
from neox_sophia.model.gpt_neox import GPTNeoX
from neox_sophia.parallel.topology import initialize_model_parallel
from neox_sophia.training.checkpoint import CheckpointError
from tests.helpers import PADDED, QUICKSTART, llama_config, llama_tokens, perturbed

transformers = pytest.importorskip("transformers")
LAYOUTS = [(tp, pipe) for tp in (1, 2) for pipe in (0, 1)]


def pythia_config(**extra):
    values = dict(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=16, max_position_embeddings=32,
                  pos_emb="rotary", rotary_pct=0.25, gpt_j_residual=True, no_weight_tying=True)
    return ModelConfig(**{**values, **extra})


ARCHS = {"pythia": pythia_config(), "llama-gqa": llama_config(2, None, False, "swiglu"),
         "pythia-tied": pythia_config(no_weight_tying=False)}


def run_config(model):
    return SimpleNamespace(model=model, data=SimpleNamespace(tokenizer_type="HFTokenizer"), values={"seed": 1})


def hf_model(model, state_dict=None):
    config = hf_config(model, PADDED)
    hf = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**{
        k: v for k, v in config.items() if k not in ("architectures", "torch_dtype", "dtype")}))
    if state_dict is not None:
        missing, unexpected = hf.load_state_dict(state_dict, strict=False)
        tied = {"lm_head.weight"} if config["tie_word_embeddings"] else set()
        assert set(missing) <= tied and not unexpected, (missing, unexpected)
    return hf.eval()


# ------------------------------------------------------------- NeoX's converters, restated
def neox_layer_states(save_dir, tp, layer, sequential):
    """get_state's source: layer ``layer`` on every TP rank, {key: tensor}."""
    tag = open(os.path.join(save_dir, "latest")).read().strip()
    path = os.path.join(save_dir, tag)
    if sequential:
        prefix = f"sequential.{layer}."
        modules = [torch.load(os.path.join(path, f"mp_rank_{t:02d}_model_states.pt"), weights_only=True)["module"]
                   for t in range(tp)]
        return [{k[len(prefix):]: v for k, v in m.items() if k.startswith(prefix)} for m in modules]
    return [torch.load(os.path.join(path, f"layer_{layer:02d}-model_{t:02d}-model_states.pt"), weights_only=True)
            for t in range(tp)]


def convert_neox_to_hf(save_dir, model, tp, sequential):
    llama = model.norm == "rmsnorm"
    top = "model." if llama else "gpt_neox."
    states = neox_layer_states(save_dir, tp, 0, sequential)
    embed = torch.cat([s["word_embeddings.weight"] for s in states])
    hf = {top + ("embed_tokens.weight" if llama else "embed_in.weight"): embed}
    norms = ["input_layernorm", "post_attention_layernorm"]
    for i in range(model.num_layers):
        s, p = neox_layer_states(save_dir, tp, i + 2, sequential), f"{top}layers.{i}."
        mean = lambda key, s=s: sum(r[key] for r in s) / tp  # noqa: E731
        cat = lambda key, dim, s=s: torch.cat([r[key] for r in s], dim=dim)  # noqa: E731
        if llama:
            hf[p + "self_attn.o_proj.weight"] = cat("attention.dense.weight", 1)
            hf[p + "mlp.down_proj.weight"] = cat("mlp.linear2.weight", 1)
            for norm in norms:
                hf[f"{p}{norm}.weight"] = mean(f"{norm}.scale")
            halves = [r["mlp.linear1.weight"].chunk(2, dim=0) for r in s]
            hf[p + "mlp.up_proj.weight"] = torch.cat([h[0] for h in halves])
            hf[p + "mlp.gate_proj.weight"] = torch.cat([h[1] for h in halves])
            qkv = torch.stack([r["attention.query_key_value.weight"] for r in s])  # reshard_and_split_qkv
            kv_hidden = model.head_dim * model.kv_heads
            q, k, v = torch.split(qkv, [model.hidden_size // tp, kv_hidden // tp, kv_hidden // tp], dim=1)
            for name, part in zip(("q_proj", "k_proj", "v_proj"), (q, k, v)):
                hf[f"{p}self_attn.{name}.weight"] = part.reshape(-1, part.shape[2])
        else:
            hf[p + "attention.dense.weight"] = cat("attention.dense.weight", 1)
            hf[p + "mlp.dense_4h_to_h.weight"] = cat("mlp.linear2.weight", 1)
            for norm in norms:
                for kind in ("weight", "bias"):
                    hf[f"{p}{norm}.{kind}"] = mean(f"{norm}.{kind}")
            for kind in ("weight", "bias"):
                hf[f"{p}mlp.dense_h_to_4h.{kind}"] = cat(f"mlp.linear1.{kind}", 0)
                hf[f"{p}attention.query_key_value.{kind}"] = cat(f"attention.query_key_value.{kind}", 0)
            hf[p + "mlp.dense_4h_to_h.bias"] = sum(r["mlp.linear2.bias"] for r in s)
            hf[p + "attention.dense.bias"] = sum(r["attention.dense.bias"] for r in s)
    s = neox_layer_states(save_dir, tp, model.num_layers + 3, sequential)
    for kind in (("scale",) if llama else ("weight", "bias")):
        hf[top + ("norm." if llama else "final_layer_norm.") + ("weight" if kind == "scale" else kind)] = \
            sum(r[f"norm.{kind}"] for r in s) / tp
    if model.no_weight_tying:
        s = neox_layer_states(save_dir, tp, model.num_layers + 4, sequential)
        # NeoX loads it into HF's output module (lm_head; GPTNeoX's embed_out in transformers 4)
        hf["lm_head.weight"] = torch.cat([r["final_linear.weight"] for r in s])
    return hf


def write_like_neox_converters(hf, model, tp, pipe, save_dir):
    """convert_hf_llama_to_neox.py (LLaMA) / shard_sequential_mp (GPTNeoX) per-rank tensors,
    saved as NeoX does: mp_rank files with 'module' (tag "0", as the LLaMA converter), or layer files."""
    llama = model.norm == "rmsnorm"
    sd = {k: v.detach().clone() for k, v in hf.state_dict().items()}
    ranks = [{} for _ in range(tp)]

    def put(layer, key, chunks):
        for t in range(tp):
            ranks[t].setdefault(layer, {})[key] = chunks[t].contiguous() if isinstance(chunks, (list, tuple)) \
                else chunks.clone()

    L = model.num_layers
    if llama:
        put(0, "word_embeddings.weight", sd["model.embed_tokens.weight"].chunk(tp))
        for i in range(L):
            p = f"model.layers.{i}."
            put(i + 2, "attention.dense.weight", sd[p + "self_attn.o_proj.weight"].chunk(tp, dim=1))
            q, k, v = (sd[f"{p}self_attn.{n}_proj.weight"].chunk(tp) for n in "qkv")
            put(i + 2, "attention.query_key_value.weight", [torch.cat(x) for x in zip(q, k, v)])
            gate, up = sd[p + "mlp.gate_proj.weight"].chunk(tp), sd[p + "mlp.up_proj.weight"].chunk(tp)
            put(i + 2, "mlp.linear1.weight", [torch.cat([u, g]) for u, g in zip(up, gate)])
            put(i + 2, "mlp.linear2.weight", sd[p + "mlp.down_proj.weight"].chunk(tp, dim=1))
            put(i + 2, "input_layernorm.scale", sd[p + "input_layernorm.weight"])
            put(i + 2, "post_attention_layernorm.scale", sd[p + "post_attention_layernorm.weight"])
        put(L + 3, "norm.scale", sd["model.norm.weight"])
        put(L + 4, "final_linear.weight", sd["lm_head.weight"].chunk(tp))
    else:
        put(0, "word_embeddings.weight", sd["gpt_neox.embed_in.weight"].chunk(tp))
        for i in range(L):
            prefix = f"gpt_neox.layers.{i}."
            for key in [k[len(prefix):] for k in sd if k.startswith(prefix)]:
                v = sd[prefix + key]
                if key in ("mlp.dense_4h_to_h.bias", "attention.dense.bias"):
                    put(i + 2, key, [v / tp] * tp)  # "they get added together"
                elif "layernorm" in key:
                    put(i + 2, key, v)
                elif key in ("attention.dense.weight", "mlp.dense_4h_to_h.weight"):
                    put(i + 2, key, v.chunk(tp, dim=1))
                else:
                    put(i + 2, key, v.chunk(tp))
        put(L + 3, "norm.weight", sd["gpt_neox.final_layer_norm.weight"])
        put(L + 3, "norm.bias", sd["gpt_neox.final_layer_norm.bias"])
        put(L + 4, "final_linear.weight", sd["lm_head.weight"].chunk(tp))
    tag = os.path.join(save_dir, "0")
    os.makedirs(tag)
    open(os.path.join(save_dir, "latest"), "w").write("0")
    header = {"dp_world_size": 1, "mp_world_size": tp, "optimizer": {}, "global_steps": 1, "skipped_steps": 1,
              "iteration": 3, "np_rng_state": np.random.get_state(), "args": {"model_parallel_size": tp}}
    for t, rank in enumerate(ranks):
        if pipe:
            for layer, keys in rank.items():
                torch.save(keys, os.path.join(tag, f"layer_{layer:02d}-model_{t:02d}-model_states.pt"))
            module = None
        else:
            module = {f"sequential.{layer}.{k}": v for layer, keys in sorted(rank.items()) for k, v in keys.items()}
        torch.save({**header, "module": module}, os.path.join(tag, f"mp_rank_{t:02d}_model_states.pt"))


# ------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("tp,pipe", LAYOUTS)
@pytest.mark.parametrize("arch", list(ARCHS))
def test_what_we_write_neox_converter_reads_to_our_logits(tmp_path, arch, tp, pipe):
    model = ARCHS[arch]
    ours = perturbed(GPTNeoX(model, PADDED, initialize_model_parallel(1, 1), seed=2)).eval()
    weights = ours.full_state_dict()
    save_neox(str(tmp_path / "neox"), weights, run_config(model), 42, tp, pipe)
    assert open(tmp_path / "neox" / "latest").read() == "global_step42" and is_neox_checkpoint(str(tmp_path / "neox"))
    names = os.listdir(tmp_path / "neox" / "global_step42")
    layer_files = [n for n in names if n.startswith("layer_")]
    assert len(layer_files) == (tp * (model.num_layers + 2 + model.no_weight_tying) if pipe else 0)
    hf = hf_model(model, convert_neox_to_hf(str(tmp_path / "neox"), model, tp, sequential=pipe == 0))
    torch.testing.assert_close(hf(llama_tokens()).logits, ours.full_logits(llama_tokens()), rtol=0, atol=1e-5)
    back, step, _ = read_neox(str(tmp_path / "neox"), model)
    assert step == 42 and list(back) == list(weights)
    for name, w in weights.items():
        torch.testing.assert_close(back[name], w, rtol=0, atol=1e-7 if "dense.bias" in name else 0, msg=name)


@pytest.mark.parametrize("tp,pipe", LAYOUTS)
@pytest.mark.parametrize("arch", ["pythia", "llama-gqa"])
def test_what_neox_converters_write_we_read_to_hugging_face_logits(tmp_path, arch, tp, pipe):
    model = ARCHS[arch]
    hf = hf_model(model)
    with torch.no_grad():  # norms and biases too: HF's init leaves them at 1 and 0
        for param in hf.parameters():
            param.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(param.numel()))
    write_like_neox_converters(hf, model, tp, pipe, str(tmp_path / "neox"))
    weights, step, where = read_neox(str(tmp_path / "neox"), model)
    assert step == 3 and where == str(tmp_path / "neox" / "0")
    ours = GPTNeoX(model, PADDED, initialize_model_parallel(1, 1), seed=2).eval()
    with torch.no_grad():
        for name, param in ours.global_named_parameters():
            param.copy_(weights[name])
    torch.testing.assert_close(ours.full_logits(llama_tokens()), hf(llama_tokens()).logits, rtol=0, atol=1e-5)


def test_sequential_residual_row_parallel_bias_is_whole_on_every_rank(tmp_path):
    """Without gpt_j_residual NeoX adds an attention/MLP-out bias once after the all-reduce (its
    RowParallelLinear with parallel_output false), so each TP rank holds the whole bias."""
    model = pythia_config(gpt_j_residual=False)
    weights = perturbed(GPTNeoX(model, PADDED, initialize_model_parallel(1, 1), seed=2)).full_state_dict()
    save_neox(str(tmp_path / "neox"), weights, run_config(model), 1, 2, 1)
    for t in range(2):
        layer = torch.load(tmp_path / "neox" / "global_step1" / f"layer_02-model_{t:02d}-model_states.pt")
        assert torch.equal(layer["attention.dense.bias"], weights["layers.0.attention.dense.bias"])
        assert torch.equal(layer["mlp.linear2.bias"], weights["layers.0.mlp.dense_4h_to_h.bias"])
    back, _, _ = read_neox(str(tmp_path / "neox"), model)
    assert all(torch.equal(back[n], w) for n, w in weights.items())


def test_legacy_llama_mlp_names_are_read(tmp_path):
    """NeoX's LLaMAParallelMLP (before 2024): w1 gate, w3 up, w2 down, each its own TP matrix."""
    model = ARCHS["llama-gqa"]
    weights = perturbed(GPTNeoX(model, PADDED, initialize_model_parallel(1, 1), seed=2)).full_state_dict()
    save_neox(str(tmp_path / "neox"), weights, run_config(model), 1, 2, 1)
    for t in range(2):
        path = tmp_path / "neox" / "global_step1" / f"layer_02-model_{t:02d}-model_states.pt"
        layer = torch.load(path)
        up, gate = layer.pop("mlp.linear1.weight").chunk(2)
        layer.update({"mlp.w1.weight": gate, "mlp.w3.weight": up, "mlp.w2.weight": layer.pop("mlp.linear2.weight")})
        torch.save(layer, path)
    back, _, _ = read_neox(str(tmp_path / "neox"), model)
    assert all(torch.equal(back[n], w) for n, w in weights.items())


def test_checkpoints_that_do_not_fit_are_named(tmp_path):
    model = ARCHS["pythia"]
    weights = GPTNeoX(model, PADDED, initialize_model_parallel(1, 1), seed=2).full_state_dict()
    save_neox(str(tmp_path / "neox"), weights, run_config(model), 1, 2, 1)
    with pytest.raises(CheckpointError, match="trained with num_layers 2, the config says 3"):
        read_neox(str(tmp_path / "neox"), pythia_config(num_layers=3))
    with pytest.raises(CheckpointError, match=r"missing: layer 2 input_layernorm\.scale"):
        read_neox(str(tmp_path / "neox"), pythia_config(norm="rmsnorm"))
    path = tmp_path / "neox" / "global_step1" / "layer_02-model_01-model_states.pt"
    layer = torch.load(path)
    layer["attention.qkv.weight"] = layer.pop("attention.query_key_value.weight")  # Transformer Engine's name
    torch.save(layer, path)
    with pytest.raises(CheckpointError, match=r"missing: layer 2 attention\.query_key_value\.weight.*unexpected: "
                                              r"layer 2 attention\.qkv\.weight"):
        read_neox(str(tmp_path / "neox"), model)
    with pytest.raises(ValueError, match="model_parallel_size: 3 does not divide num_attention_heads"):
        save_neox(str(tmp_path / "other"), weights, run_config(model), 1, 3, 0)


def test_vocabulary_padding_follows_neox():
    assert neox_padded_vocab(50304, 128, 1, 1) == 50304
    assert neox_padded_vocab(50304, 128, 1, 2) == 50432  # NeoX pads the 20B tokenizer's 50277 so at TP 2
    with pytest.raises(ValueError, match="--vocab-size: needed"):
        neox_padded_vocab(50432, 128, 2, 1)
    assert neox_padded_vocab(50432, 128, 2, 1, vocab_size=50277) == 50304
    embed = torch.randn(6, 2)
    assert torch.equal(fit_vocab({"embed_in.weight": embed}, 4)["embed_in.weight"], embed[:4])
    assert fit_vocab({"embed_in.weight": embed}, 8)["embed_in.weight"][6:].abs().sum() == 0


def test_from_neox_on_the_command_line_writes_a_universal_checkpoint(tmp_path, capsys):
    """The quick start's model exported at TP=2, read back for a run whose config says TP=1; a
    config that does not fit is one line and exit code 2."""
    from neox_sophia.cli import main
    from neox_sophia.config import load_config
    from neox_sophia.convert.universal import load_universal
    from neox_sophia.data.tokenizers import build_tokenizer

    from tokenizers import Tokenizer, models

    tokenizer = tmp_path / "tokenizer.json"  # any tokenizers JSON will do: a 300-token BPE
    Tokenizer(models.BPE(vocab={f"t{i}": i for i in range(300)}, merges=[])).save(str(tokenizer))
    sets = [f"vocab_file={tokenizer}", "data_path=unused", "tokenizer_type=HFTokenizer"]
    cfg = load_config([QUICKSTART], sets, warn=False)
    vocab = build_tokenizer("HFTokenizer", str(tokenizer), None).vocab_size
    assert vocab == 300
    padded = cfg.padded_vocab_size(vocab)
    weights = GPTNeoX(cfg.model, padded, initialize_model_parallel(1, 1), seed=4).full_state_dict()
    save_neox(str(tmp_path / "neox"), weights, SimpleNamespace(model=cfg.model, data=cfg.data, values=cfg.values),
              9, 2, 0)
    args = ["convert", "from-neox", "--input", str(tmp_path / "neox"), "--output", str(tmp_path / "uc"),
            "--config", QUICKSTART] + [x for s in sets for x in ("--set", s)]
    assert main(args) == 0
    universal = load_universal(str(tmp_path / "uc"))
    assert universal.step == 9 and not universal.optimizer
    assert all(torch.equal(universal.weights[n], w) for n, w in weights.items())
    capsys.readouterr()
    assert main(args[:-len(sets) * 2] + [x for s in sets + ["num_layers=3"] for x in ("--set", s)]
                + ["--overwrite"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "trained with num_layers 2, the config says 3" in err
