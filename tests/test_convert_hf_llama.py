"""Hugging Face export and import of the LLaMA family (neox_sophia.convert.hf, hf_llama.py)
against transformers' LlamaForCausalLM and MistralForCausalLM.

Ours -> HF: transformers loads the folder with nothing missing or unexpected and gives our
logits; HF -> ours -> HF: a random transformers model comes back tensor for tensor, and the NeoX
keys read from its config.json describe our model exactly. Settings an HF class cannot compute
are refused by key.
"""
import json
import os

import pytest
import torch

from neox_sophia.config.model import ModelConfig
from neox_sophia.convert.hf import from_hf, hf_config, model_config_from_hf, to_hf
from neox_sophia.model.gpt_neox import GPTNeoX, parameter_shapes
from neox_sophia.parallel.topology import initialize_model_parallel
from tests.helpers import LLAMA_VARIANTS, PADDED, llama_config, llama_tokens, perturbed

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")


def our_model(cfg, weights=None):
    model = GPTNeoX(cfg, PADDED, initialize_model_parallel(1, 1), seed=9)
    if weights is None:
        return perturbed(model).eval()
    with torch.no_grad():
        for name, param in model.global_named_parameters():
            param.copy_(weights[name])
    return model.eval()


def load_hf(path):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model.eval()


@pytest.mark.parametrize("variant,tied", [("llama", False), ("gqa-biases", True), ("mqa-geglu", False),
                                          ("mistral-window", False)])
def test_export_loads_in_transformers_with_our_logits_and_round_trips(tmp_path, variant, tied):
    cfg = llama_config(*LLAMA_VARIANTS[variant])
    cfg.no_weight_tying = not tied
    model = our_model(cfg)
    weights = model.full_state_dict()
    out = to_hf(weights, cfg, PADDED, str(tmp_path / "hf"))
    hf = load_hf(out)
    expected_class = "MistralForCausalLM" if variant == "mistral-window" else "LlamaForCausalLM"
    assert type(hf).__name__ == expected_class and hf.config.num_key_value_heads == cfg.kv_heads
    files = safetensors_torch.load_file(os.path.join(out, "model.safetensors"))
    assert ("lm_head.weight" in files) == (not tied)
    torch.testing.assert_close(hf(llama_tokens()).logits, model.full_logits(llama_tokens()), rtol=0, atol=1e-5)
    back = from_hf(out, cfg, PADDED)
    assert list(back) == list(weights)
    for name, w in weights.items():
        assert torch.equal(back[name], w), name


def random_hf_model(kind, vocab=100, **extra):
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=32, rms_norm_eps=1e-5, rope_theta=250000.0,
                  bos_token_id=1, eos_token_id=2, **extra)
    if kind == "mistral":
        config = transformers.MistralConfig(**common, sliding_window=6)
    else:
        config = transformers.LlamaConfig(**common, attention_bias=True, mlp_bias=True)
    torch.manual_seed(4)
    model = (transformers.MistralForCausalLM if kind == "mistral" else transformers.LlamaForCausalLM)(config).eval()
    with torch.no_grad():  # norms and biases too: HF's init leaves them at 1 and 0
        for param in model.parameters():
            param.normal_(0.0, 0.05)
    return model


@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_hf_to_ours_to_hf_is_exact(tmp_path, kind):
    source = random_hf_model(kind)
    source.save_pretrained(tmp_path / "src")
    keys = model_config_from_hf(str(tmp_path / "src"))
    assert keys["num_kv_heads"] == 2 and keys["rotary_emb_base"] == 250000 and keys["activation"] == "swiglu"
    cfg = ModelConfig(**{**keys, "seq_length": 16})
    cfg.validate()
    assert cfg.ffn_hidden_size == 80 and cfg.sliding_window(0) == (5 if kind == "mistral" else None)
    weights = from_hf(str(tmp_path / "src"), cfg, PADDED)
    assert not weights["embed_out.weight"][100:].any()  # padded rows are zeros
    ours = our_model(cfg, weights).full_logits(llama_tokens())
    x = llama_tokens()
    torch.testing.assert_close(ours[..., :100], source(x).logits, rtol=0, atol=1e-5)
    out = to_hf(weights, cfg, PADDED, str(tmp_path / "out"))
    original = safetensors_torch.load_file(os.path.join(tmp_path / "src", "model.safetensors"))
    exported = safetensors_torch.load_file(os.path.join(out, "model.safetensors"))
    assert exported.keys() == original.keys()
    for name, tensor in original.items():
        assert torch.equal(exported[name][:tensor.shape[0]], tensor), name


def test_config_mismatches_are_named(tmp_path):
    cfg = llama_config(*LLAMA_VARIANTS["gqa-biases"])
    out = to_hf(our_model(cfg).full_state_dict(), cfg, PADDED, str(tmp_path / "hf"))
    other = llama_config(4, None, True, "swiglu", rotary_emb_base=10000)
    with pytest.raises(ValueError) as err:
        from_hf(out, other, PADDED)
    message = str(err.value)
    assert "num_key_value_heads: HF 2, ours 4 (from num_kv_heads: 4)" in message
    assert "rope_theta: HF 500000, ours 10000 (from rotary_emb_base: 10000)" in message
    with pytest.raises(ValueError, match="is a LlamaForCausalLM, which cannot compute .*\n  norm: 'layernorm'"):
        from_hf(out, ModelConfig(**{**cfg.__dict__, "norm": "layernorm"}), PADDED)


@pytest.mark.parametrize("change,refused", [
    ({"rotary_pct": 0.5}, "rotary_pct: 0.5 cannot be expressed"),
    ({"gpt_j_residual": True}, "gpt_j_residual: true cannot be expressed"),
    ({"sliding_window_width": 4, "attention_config": [[["flash", "global"], 1]]}, "sliding_window_width: a window in "
                                                                                 "some layers only"),
    ({"sliding_window_width": 4, "attention_config": [[["flash"], 2]], "use_bias_in_mlp": True},
     "use_bias_in_mlp: true cannot be expressed with a sliding window"),
])
def test_settings_llama_cannot_express_are_refused(change, refused):
    cfg = ModelConfig(**{**llama_config(*LLAMA_VARIANTS["llama"]).__dict__, **change})
    with pytest.raises(ValueError, match=f"^{refused}"):
        hf_config(cfg, PADDED)


def test_unsupported_llama_files_are_refused(tmp_path):
    random_hf_model("llama").save_pretrained(tmp_path / "src")
    path = tmp_path / "src" / "config.json"
    config = json.loads(path.read_text())
    for change, message in [({"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "rope_theta": 5e5}},
                             "rope type 'llama3'"), ({"head_dim": 32}, "head_dim: 32 is not hidden_size"),
                            ({"hidden_act": "gelu_pytorch_tanh"},
                             "hidden_act: 'gelu_pytorch_tanh' cannot be expressed")]:
        path.write_text(json.dumps({**config, **change}))
        with pytest.raises(ValueError, match=message):
            model_config_from_hf(str(tmp_path / "src"))


@pytest.mark.parametrize("variant", list(LLAMA_VARIANTS))
def test_parameter_shapes_are_our_models(variant):
    cfg = llama_config(*LLAMA_VARIANTS[variant])
    weights = our_model(cfg).full_state_dict()
    assert {n: tuple(w.shape) for n, w in weights.items()} == parameter_shapes(cfg, PADDED)
    assert list(weights) == list(parameter_shapes(cfg, PADDED))
