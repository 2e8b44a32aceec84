"""The LLaMA-family options of NeoX configs (RMSNorm, SwiGLU, grouped-query attention, rotary
base, sliding window) against Hugging Face's LlamaForCausalLM and MistralForCausalLM.

The same full weights must give the same logits (fp32) at TP=1 and at TP=2 over 2 gloo ranks,
and one seed the same full weights at any TP size. The HF state dict is built here from our
weights by the rules of NeoX's own converters (tools/ckpts/convert_neox_to_hf.py and
convert_hf_llama_to_neox.py): q/k/v are the rows of each key/value group, no rotary permutation
(NeoX and HF both rotate halves), gate/up/down as named.
"""
import pytest
import torch

from neox_sophia.config.model import ModelConfig
from neox_sophia.model.gpt_neox import GPTNeoX
from neox_sophia.parallel.topology import initialize_model_parallel
from tests.distributed import run_ranks
from tests.helpers import LLAMA_SEED, LLAMA_VARIANTS, PADDED, llama_config, llama_tokens, perturbed

transformers = pytest.importorskip("transformers")

HF_ACT = {"swiglu": "silu", "geglu": "gelu"}


def hf_state_dict(weights, cfg):
    group, head_dim = cfg.num_attention_heads // cfg.kv_heads, cfg.head_dim
    names = {"embed_in.weight": "model.embed_tokens.weight", "embed_out.weight": "lm_head.weight",
             "final_layer_norm.weight": "model.norm.weight"}
    out = {}
    for name, tensor in weights.items():
        if name in names:
            out[names[name]] = tensor
        elif ".attention.query_key_value." in name:
            prefix, kind = "model." + name.split("attention.")[0] + "self_attn.", name.rsplit(".", 1)[1]
            rows = tensor.view(cfg.kv_heads, group + 2, head_dim, *tensor.shape[1:])
            out[prefix + "q_proj." + kind] = rows[:, :group].reshape(-1, *tensor.shape[1:])
            out[prefix + "k_proj." + kind] = rows[:, group].reshape(-1, *tensor.shape[1:])
            out[prefix + "v_proj." + kind] = rows[:, group + 1].reshape(-1, *tensor.shape[1:])
        else:
            out["model." + name.replace("attention.dense", "self_attn.o_proj")] = tensor
    return out


def hf_model(cfg, weights):
    kv, window, biases, activation = cfg.num_kv_heads, cfg.sliding_window_width, cfg.use_bias_in_mlp, cfg.activation
    common = dict(vocab_size=PADDED, hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_hidden_size,
                  num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_attention_heads,
                  num_key_value_heads=kv or cfg.num_attention_heads, max_position_embeddings=32,
                  rms_norm_eps=cfg.rms_norm_epsilon, rope_theta=cfg.rotary_emb_base, tie_word_embeddings=False,
                  hidden_act=HF_ACT[activation])
    if window:  # NeoX's window w (flash-attn window_size=(w, -1)) is HF's sliding_window w + 1
        model = transformers.MistralForCausalLM(transformers.MistralConfig(**common, sliding_window=window + 1))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common, attention_bias=biases,
                                                                       mlp_bias=biases))
    missing, unexpected = model.load_state_dict(hf_state_dict(weights, cfg), strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    return model.eval()


@pytest.mark.parametrize("variant", list(LLAMA_VARIANTS))
def test_tp1_matches_hugging_face_llama_and_mistral(variant):
    cfg = llama_config(*LLAMA_VARIANTS[variant])
    model = perturbed(GPTNeoX(cfg, PADDED, initialize_model_parallel(1, 1), seed=LLAMA_SEED)).eval()
    weights = model.full_state_dict()
    assert all("bias" not in n for n in weights) or LLAMA_VARIANTS[variant][2]
    torch.testing.assert_close(model.full_logits(llama_tokens()), hf_model(cfg, weights)(llama_tokens()).logits,
                               rtol=1e-5, atol=1e-5)


def test_the_sliding_window_is_neox_window_plus_one_in_hugging_face():
    """The window must matter at this length: HF's sliding_window w (not w + 1) gives other logits."""
    cfg = llama_config(*LLAMA_VARIANTS["mistral-window"])
    model = perturbed(GPTNeoX(cfg, PADDED, initialize_model_parallel(1, 1), seed=LLAMA_SEED)).eval()
    weights = model.full_state_dict()
    hf_off_by_one = hf_model(llama_config(2, 4, False, "swiglu"), weights)  # HF sliding_window 5
    assert (hf_off_by_one(llama_tokens()).logits - model.full_logits(llama_tokens())).abs().max() > 1e-2


def test_gated_widths_follow_neox_rounding():
    """NeoX's ParallelMLP: LLaMA-7B's intermediate_size 32768 with mlp_multiple_of 256 is 11008 per
    branch; Mistral's published 14336 with multiple 1 gives mismatched matrices (refused)."""
    seven_b = ModelConfig(num_layers=1, hidden_size=4096, num_attention_heads=32, seq_length=8,
                          max_position_embeddings=8, pos_emb="rotary", activation="swiglu", intermediate_size=32768,
                          mlp_multiple_of=256)
    assert seven_b.mlp_widths == (22016, 11008) and seven_b.ffn_hidden_size == 11008
    seven_b.intermediate_size = None  # 4h -> int(2/3 x 16384) = 10922 -> 5632 per branch
    assert seven_b.mlp_widths == (11264, 5632)
    mistral = ModelConfig(**{**seven_b.__dict__, "intermediate_size": 14336, "mlp_multiple_of": 1, "num_kv_heads": 8})
    with pytest.raises(ValueError, match=r"^intermediate_size: 14336 .* width 9558 .* taking 4778 .*"
                                         r"set intermediate_size: 43008$"):
        mistral.validate()
    mistral.intermediate_size = 43008
    mistral.validate()
    assert mistral.ffn_hidden_size == 14336


TP2_VARIANTS = [v for v, args in LLAMA_VARIANTS.items() if (args[0] or 4) % 2 == 0]  # key/value heads split over 2


def tp2_worker(rank, world_size):
    grid = initialize_model_parallel(2, 1)
    out = {}
    for variant in TP2_VARIANTS:
        args = LLAMA_VARIANTS[variant]
        model = GPTNeoX(llama_config(*args), PADDED, grid, seed=LLAMA_SEED).eval()
        qkv = model.layers[0].attention.query_key_value.weight.shape[0]
        out[variant] = {"logits": model.full_logits(llama_tokens()), "weights": model.full_state_dict(),
                        "qkv_rows": qkv}
    return out


@pytest.mark.distributed
def test_tp2_matches_hugging_face_and_tp1_weights():
    ranks = run_ranks(tp2_worker, 2)
    grid = initialize_model_parallel(1, 1)
    for variant in TP2_VARIANTS:
        cfg = llama_config(*LLAMA_VARIANTS[variant])
        single = GPTNeoX(cfg, PADDED, grid, seed=LLAMA_SEED).full_state_dict()
        theirs = hf_model(cfg, single)(llama_tokens()).logits
        for r in ranks:
            got = r[variant]
            assert got["qkv_rows"] * 2 == single["layers.0.attention.query_key_value.weight"].shape[0]  # sharded
            assert got["weights"].keys() == single.keys()
            for name, w in single.items():
                assert torch.equal(got["weights"][name], w), (variant, name)  # layout-invariant init
            torch.testing.assert_close(got["logits"], theirs, rtol=1e-5, atol=1e-5)
