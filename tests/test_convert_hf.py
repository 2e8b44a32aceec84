"""Hugging Face export and import (neox_sophia.convert.hf) against transformers' GPTNeoXForCausalLM.

Ours -> HF: transformers loads the folder with no missing or unexpected tensors and gives our
logits; HF -> ours -> HF: a random transformers model comes back tensor for tensor; every error
names what is wrong and leaves no half-written output.
"""
import json
import os

import pytest
import torch

from neox_sophia.config.model import ModelConfig
from neox_sophia.convert import hf as convert
from neox_sophia.convert.hf import from_hf, hf_config, model_config_from_hf, to_hf
from neox_sophia.model.gpt_neox import GPTNeoX
from neox_sophia.parallel.topology import initialize_model_parallel

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

VOCAB, PADDED = 100, 128
SEED = 11


def tiny_config(gpt_j_residual=True, tied=False, **extra):
    values = dict(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=16, max_position_embeddings=32,
                  pos_emb="rotary", rotary_pct=0.25, gpt_j_residual=gpt_j_residual, no_weight_tying=not tied)
    return ModelConfig(**{**values, **extra})


def tokens(vocab=VOCAB):
    return torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(0))


def our_model(cfg, weights=None, perturb=0.0):
    """Our model at TP=1; ``perturb`` adds noise to every weight (LayerNorms and biases too, and big
    enough that exact and tanh GELU give logits 1e-4 apart: a wrong hidden_act must show)."""
    model = GPTNeoX(cfg, PADDED, initialize_model_parallel(1, 1), seed=SEED).eval()
    generator = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for name, param in model.global_named_parameters():
            if weights is not None:
                param.copy_(weights[name])
            param.add_(torch.randn(param.shape, generator=generator) * perturb)
    return model


def load_hf(path):
    model, info = transformers.GPTNeoXForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info  # nothing left at random init
    return model.eval()


def read_safetensors(path):
    return safetensors_torch.load_file(os.path.join(path, "model.safetensors"))


@pytest.mark.parametrize("gpt_j_residual,tied,gelu_tanh", [(True, False, False), (False, False, True),
                                                           (True, True, False), (False, True, False)])
def test_export_loads_in_transformers_with_our_logits_and_round_trips(tmp_path, gpt_j_residual, tied, gelu_tanh):
    cfg = tiny_config(gpt_j_residual, tied, bias_gelu_fusion=gelu_tanh)
    model = our_model(cfg, perturb=0.1)
    weights = model.full_state_dict()
    out = to_hf(weights, cfg, PADDED, str(tmp_path / "hf"))
    files = read_safetensors(out)
    assert ("embed_out.weight" in files) == (not tied) and "lm_head.weight" not in files
    hf = load_hf(out)
    assert hf.config.vocab_size == PADDED and hf.config.use_parallel_residual == gpt_j_residual
    assert hf.config.hidden_act == ("gelu_pytorch_tanh" if gelu_tanh else "gelu")
    if tied:
        assert hf.get_output_embeddings().weight.data_ptr() == hf.gpt_neox.embed_in.weight.data_ptr()
    torch.testing.assert_close(hf(tokens()).logits, model.full_logits(tokens()), rtol=0, atol=1e-5)
    back = from_hf(out, cfg, PADDED)
    assert list(back) == list(weights)
    for name, w in weights.items():
        assert back[name].dtype == torch.float32 and torch.equal(back[name], w), name


def random_hf_model(vocab, tied=False):
    config = transformers.GPTNeoXConfig(
        vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=192,
        max_position_embeddings=32, rotary_pct=0.5, rotary_emb_base=5000, use_parallel_residual=True,
        tie_word_embeddings=tied, hidden_act="gelu", layer_norm_eps=1e-5, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(3)
    model = transformers.GPTNeoXForCausalLM(config).eval()
    with torch.no_grad():  # LayerNorms and biases too: HF's init leaves them at 1 and 0
        for param in model.parameters():
            param.normal_(0.0, 0.05)
    return model


@pytest.mark.parametrize("vocab", [PADDED, VOCAB])
def test_hf_to_ours_to_hf_is_exact(tmp_path, vocab):
    source = random_hf_model(vocab)
    source.save_pretrained(tmp_path / "src")
    keys = model_config_from_hf(str(tmp_path / "src"))
    assert keys["rotary_pct"] == 0.5 and keys["rotary_emb_base"] == 5000 and keys["intermediate_size"] == 192
    cfg = ModelConfig(**keys)
    cfg.validate()
    weights = from_hf(str(tmp_path / "src"), cfg, PADDED)
    assert weights["embed_in.weight"].shape == (PADDED, 64)
    assert not weights["embed_out.weight"][vocab:].any()  # padded rows are zeros
    ours = our_model(cfg, weights).full_logits(tokens())
    torch.testing.assert_close(ours[..., :vocab], source(tokens()).logits, rtol=0, atol=1e-5)

    out = to_hf(weights, cfg, PADDED, str(tmp_path / "out"))
    original, exported = read_safetensors(tmp_path / "src"), read_safetensors(out)
    assert exported.keys() == original.keys()
    for name, tensor in original.items():  # export keeps the padded rows (vocab_size = PADDED)
        assert torch.equal(exported[name][:tensor.shape[0]], tensor), name
        assert exported[name].shape[0] == (PADDED if "embed" in name else tensor.shape[0]), name
    torch.testing.assert_close(load_hf(out)(tokens()).logits[..., :vocab], source(tokens()).logits,
                               rtol=0, atol=1e-5)


def test_bfloat16_export(tmp_path):
    cfg = tiny_config()
    weights = our_model(cfg).full_state_dict()
    out = to_hf(weights, cfg, PADDED, str(tmp_path / "hf"), dtype="bfloat16")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["dtype"] == config["torch_dtype"] == "bfloat16"
    files = read_safetensors(out)
    assert {t.dtype for t in files.values()} == {torch.bfloat16}
    assert torch.equal(files["gpt_neox.layers.1.mlp.dense_4h_to_h.weight"],
                       weights["layers.1.mlp.dense_4h_to_h.weight"].bfloat16())
    back = from_hf(out, cfg, PADDED)
    for name, w in weights.items():
        assert back[name].dtype == torch.float32 and torch.equal(back[name], w.bfloat16().float()), name
    assert load_hf(out).dtype == torch.bfloat16


def test_float16_overflow_is_refused(tmp_path):
    cfg = tiny_config()
    weights = our_model(cfg).full_state_dict()
    weights["layers.0.mlp.dense_h_to_4h.bias"][0] = 1e6
    with pytest.raises(ValueError, match=r"layers\.0\.mlp\.dense_h_to_4h\.bias: values overflow float16"):
        to_hf(weights, cfg, PADDED, str(tmp_path / "hf"), dtype="float16")
    assert not os.path.exists(tmp_path / "hf")


def test_existing_output_and_overwrite(tmp_path):
    cfg = tiny_config()
    weights = our_model(cfg).full_state_dict()
    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="exists and is not empty.*overwrite"):
        to_hf(weights, cfg, PADDED, str(out))
    assert os.listdir(out) == ["keep.txt"]
    to_hf(weights, cfg, PADDED, str(out), overwrite=True)
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    assert sorted(os.listdir(tmp_path)) == ["hf"]  # no temporary or old directories left


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_exported_files_follow_the_umask(tmp_path, umask):
    """safetensors writes its files 0600 and the temporary folder is 0700: other users of a shared
    cluster could not read the model. Both follow the umask, as any new file does."""
    cfg = tiny_config()
    weights = our_model(cfg).full_state_dict()
    previous = os.umask(umask)
    try:
        out = to_hf(weights, cfg, PADDED, str(tmp_path / "hf"))
    finally:
        os.umask(previous)
    assert os.stat(out).st_mode & 0o777 == 0o777 & ~umask
    for name in ("config.json", "model.safetensors"):
        assert os.stat(os.path.join(out, name)).st_mode & 0o777 == 0o666 & ~umask, name


def test_a_failed_write_leaves_nothing(tmp_path, monkeypatch):
    cfg = tiny_config()
    weights = our_model(cfg).full_state_dict()

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors_torch, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        to_hf(weights, cfg, PADDED, str(tmp_path / "hf"))
    assert os.listdir(tmp_path) == []


def test_tokenizer_files_and_eod_ids(tmp_path):
    from tokenizers import ByteLevelBPETokenizer

    trained = ByteLevelBPETokenizer()
    trained.train_from_iterator(["hello world, the quick brown fox " * 20], vocab_size=300,
                                special_tokens=["<|endoftext|>"], show_progress=False)
    trained.save(str(tmp_path / "20B_tokenizer.json"))  # NeoX's name for a tokenizers file
    cfg = tiny_config()
    out = to_hf(our_model(cfg).full_state_dict(), cfg, PADDED, str(tmp_path / "hf"),
                tokenizer_files=[str(tmp_path / "20B_tokenizer.json")])
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", "tokenizer.json"]
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["bos_token_id"] == config["eos_token_id"] == 0
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert tokenizer.decode(tokenizer("hello world")["input_ids"]) == "hello world"


def test_sharded_safetensors_and_pytorch_bin(tmp_path):
    source = random_hf_model(PADDED)
    source.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    cfg = ModelConfig(**model_config_from_hf(str(tmp_path / "sharded")))
    expected = from_hf(str(tmp_path / "sharded"), cfg, PADDED)
    # a Pythia-era folder: transformers 4.x config keys, a .bin holding mask and rotary buffers too
    config = json.loads((tmp_path / "sharded" / "config.json").read_text())
    rope = config.pop("rope_parameters")
    config.update(rotary_pct=rope["partial_rotary_factor"], rotary_emb_base=rope["rope_theta"],
                  torch_dtype=config.pop("dtype"))
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text(json.dumps(config))
    state = dict(source.state_dict())
    state.update({"gpt_neox.layers.0.attention.bias": torch.ones(1, 1, 32, 32, dtype=torch.bool),
                  "gpt_neox.layers.0.attention.masked_bias": torch.tensor(-1e9),
                  "gpt_neox.layers.0.attention.rotary_emb.inv_freq": torch.ones(8)})
    torch.save(state, tmp_path / "bin" / "pytorch_model.bin")
    got = from_hf(str(tmp_path / "bin"), cfg, PADDED)
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[name], expected[name]) for name in expected)


@pytest.fixture
def exported(tmp_path):
    cfg = tiny_config()
    return cfg, to_hf(our_model(cfg).full_state_dict(), cfg, PADDED, str(tmp_path / "hf"))


def test_config_mismatches_are_named(exported):
    cfg, out = exported
    other = tiny_config(gpt_j_residual=False, num_layers=3, bias_gelu_fusion=True)
    with pytest.raises(ValueError) as err, pytest.warns(UserWarning, match="hidden_act"):
        from_hf(out, other, PADDED)
    message = str(err.value)
    assert "use_parallel_residual: HF True, ours False (from gpt_j_residual: False)" in message
    assert "num_hidden_layers: HF 2, ours 3 (from num_layers: 3)" in message
    assert "hidden_act" not in message  # exact vs tanh GELU: a warning, not an error (Pythia's case)


def test_pythia_style_gelu_mismatch_is_a_warning(exported):
    """NeoX trained Pythia with tanh GELU (bias_gelu_fusion: true); its HF configs say "gelu"."""
    cfg, out = exported
    with pytest.warns(UserWarning, match="hidden_act: HF 'gelu', ours 'gelu_pytorch_tanh'"):
        weights = from_hf(out, tiny_config(bias_gelu_fusion=True), PADDED)
    assert set(weights) == set(our_model(cfg).full_state_dict())
    with pytest.raises(ValueError, match="vocab_size: HF 128 is larger than our padded vocabulary 64"):
        from_hf(out, cfg, 64)


def test_wrong_shape_is_named(exported):
    cfg, out = exported
    path = os.path.join(out, "model.safetensors")
    tensors = safetensors_torch.load_file(path)
    tensors["gpt_neox.layers.1.attention.dense.weight"] = torch.zeros(64, 32)
    safetensors_torch.save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"layers\.1\.attention\.dense\.weight: shape \[64, 32\], expected \[64, 64\]"):
        from_hf(out, cfg, PADDED)


def test_missing_tensor_is_named(exported):
    cfg, out = exported
    path = os.path.join(out, "model.safetensors")
    tensors = safetensors_torch.load_file(path)
    del tensors["embed_out.weight"]
    safetensors_torch.save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing tensors: embed_out\.weight"):
        from_hf(out, cfg, PADDED)


def test_truncated_safetensors_is_refused(exported):
    cfg, out = exported
    path = os.path.join(out, "model.safetensors")
    os.truncate(path, os.path.getsize(path) // 2)
    with pytest.raises(ValueError, match=r"model\.safetensors: cannot be read.*is the file complete"):
        from_hf(out, cfg, PADDED)


@pytest.mark.parametrize("key,value,refused", [
    ("pos_emb", "learned", "pos_emb"), ("gpt_j_tied", True, "gpt_j_tied"), ("num_kv_heads", 2, "num_kv_heads"),
    ("use_bias_in_mlp", False, "use_bias_in_mlp"),
    ("norm", "rmsnorm", "activation"),  # RMSNorm is LLaMA's, whose MLP is gated
    ("activation", "swiglu", "norm"),  # a gated MLP is LLaMA's, whose norm is RMSNorm
])
def test_settings_hugging_face_cannot_express_are_refused(key, value, refused):
    with pytest.raises(ValueError, match=f"^{refused}: .*cannot be expressed"):
        hf_config(tiny_config(**{key: value}), PADDED)


def test_unsupported_hugging_face_settings_are_refused(exported):
    cfg, out = exported
    config_path = os.path.join(out, "config.json")
    config = json.loads(open(config_path).read())
    json.dump({**config, "hidden_act": "relu"}, open(config_path, "w"))
    with pytest.raises(ValueError, match="hidden_act: 'relu' cannot be expressed"):
        from_hf(out, cfg, PADDED)
    json.dump({**config, "rope_parameters": {"rope_type": "linear", "factor": 2.0}}, open(config_path, "w"))
    with pytest.raises(ValueError, match="rope type 'linear'"):
        model_config_from_hf(out)


def test_expected_shapes_are_our_models():
    cfg = tiny_config(tied=True, use_bias_in_attn_linear=False, intermediate_size=96)
    weights = our_model(cfg).full_state_dict()
    assert {n: tuple(w.shape) for n, w in weights.items()} == convert.expected_shapes(cfg, PADDED)
