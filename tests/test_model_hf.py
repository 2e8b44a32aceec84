"""Our GPT-NeoX on megatron-core TP layers against Hugging Face's GPTNeoXForCausalLM.

The same full weights must give the same logits (fp32), at TP=1 and at TP=2 over 2 gloo ranks,
for sequential and parallel (gpt_j) residuals and partial and full rotary; and one seed must
give the same full weights at any TP size (layout-invariant init).
"""
import pytest
import torch

from neox_sophia.model.gpt_neox import GPTNeoX
from neox_sophia.parallel.topology import initialize_model_parallel
from tests.distributed import run_ranks
from tests.helpers import NEOX_SEED, PADDED, neox_tokens, tiny_config

VARIANTS = [(gpt_j, pct) for gpt_j in (False, True) for pct in (0.25, 1.0)]


def hf_model(cfg, weights):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    hf_cfg = GPTNeoXConfig(
        vocab_size=PADDED, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_attention_heads, intermediate_size=cfg.ffn_hidden_size,
        max_position_embeddings=cfg.max_position_embeddings, rotary_pct=cfg.rotary_pct,
        rotary_emb_base=cfg.rotary_emb_base, use_parallel_residual=cfg.gpt_j_residual,
        tie_word_embeddings=not cfg.no_weight_tying, layer_norm_eps=cfg.layernorm_epsilon,
        hidden_act="gelu", attention_dropout=0.0, hidden_dropout=0.0, attention_bias=True)
    model = GPTNeoXForCausalLM(hf_cfg).eval()
    state = {("lm_head.weight" if name == "embed_out.weight" else "gpt_neox." + name): w
             for name, w in weights.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    allowed = {"lm_head.weight"} if hf_cfg.tie_word_embeddings else set()
    assert not unexpected and set(missing) <= allowed, (missing, unexpected)
    if hf_cfg.tie_word_embeddings:
        assert model.lm_head.weight.data_ptr() == model.gpt_neox.embed_in.weight.data_ptr()
    return model


@pytest.mark.parametrize("gpt_j_residual,rotary_pct", VARIANTS)
def test_tp1_matches_hugging_face(gpt_j_residual, rotary_pct):
    initialize_model_parallel(1, 1)
    cfg = tiny_config(gpt_j_residual, rotary_pct)
    model = GPTNeoX(cfg, PADDED, initialize_model_parallel(1, 1), seed=NEOX_SEED).eval()
    ours = model.full_logits(neox_tokens())
    theirs = hf_model(cfg, model.full_state_dict())(neox_tokens()).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def tp2_worker(rank, world_size):
    grid = initialize_model_parallel(2, 1)
    out = {}
    for gpt_j, pct in VARIANTS:
        model = GPTNeoX(tiny_config(gpt_j, pct), PADDED, grid, seed=NEOX_SEED).eval()
        shard = model.embedding.embed_in.weight.shape[0]
        out[(gpt_j, pct)] = {"logits": model.full_logits(neox_tokens()), "weights": model.full_state_dict(),
                             "vocab_shard": shard}
    return {f"{k[0]}-{k[1]}": v for k, v in out.items()}


@pytest.mark.distributed
def test_tp2_matches_hugging_face_and_tp1_weights():
    ranks = run_ranks(tp2_worker, 2)
    grid = initialize_model_parallel(1, 1)
    for gpt_j, pct in VARIANTS:
        cfg = tiny_config(gpt_j, pct)
        single = GPTNeoX(cfg, PADDED, grid, seed=NEOX_SEED).full_state_dict()
        for r in ranks:
            got = r[f"{gpt_j}-{pct}"]
            assert got["vocab_shard"] == PADDED // 2  # really sharded
            assert got["weights"].keys() == single.keys()
            for name, w in single.items():
                assert torch.equal(got["weights"][name], w), name  # layout-invariant init
            theirs = hf_model(cfg, single)(neox_tokens()).logits
            torch.testing.assert_close(got["logits"], theirs, rtol=1e-5, atol=1e-5)


def test_tied_embedding_matches_hugging_face():
    grid = initialize_model_parallel(1, 1)
    cfg = tiny_config(False, 0.25)
    cfg.no_weight_tying = False
    model = GPTNeoX(cfg, PADDED, grid, seed=NEOX_SEED).eval()
    weights = model.full_state_dict()
    assert "embed_out.weight" not in weights
    ours = model.full_logits(neox_tokens())
    theirs = hf_model(cfg, weights)(neox_tokens()).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_loss_is_the_mean_cross_entropy_of_the_full_logits():
    from neox_sophia.model.layers import lm_loss

    grid = initialize_model_parallel(1, 1)
    model = GPTNeoX(tiny_config(True, 0.25), PADDED, grid, seed=NEOX_SEED)
    x = neox_tokens()
    labels = torch.roll(x, -1, dims=1)
    mask = torch.ones_like(x)
    mask[:, -1] = 0
    logits = model.full_logits(x)
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, PADDED), labels[:, :-1].reshape(-1))
    torch.testing.assert_close(lm_loss(model(x), labels, mask), expected, rtol=1e-6, atol=1e-6)


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    from neox_sophia.model.layers import lm_loss

    grid = initialize_model_parallel(1, 1)
    x = neox_tokens()
    labels, mask = torch.roll(x, -1, dims=1), torch.ones_like(x)
    results = []
    for checkpoint in (False, True):
        model = GPTNeoX(tiny_config(False, 0.25, checkpoint_activations=checkpoint), PADDED, grid, seed=NEOX_SEED)
        assert all(layer.checkpoint == checkpoint for layer in model.layers)
        loss = lm_loss(model(x), labels, mask)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b, rtol=0, atol=0)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-6, atol=1e-7, msg=name)
