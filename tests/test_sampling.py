"""Labels sampled from vocab-parallel logits: the same at TP=1, 2 and 4, never a padded column,
distributed as the softmax; the GNB loss on shards equals the unsharded one."""
import pytest
import torch
import torch.distributed as dist

from neox_sophia.parallel import sampling
from neox_sophia.parallel.sampling import label_uniforms, sample_vocab_parallel
from tests.distributed import run_ranks

pytestmark = pytest.mark.distributed

VOCAB, PADDED = 1000, 1024
TOKENS = (6, 512)
CHUNK_NUMEL = sampling.CPU_CHUNK_NUMEL


def full_logits():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(*TOKENS, PADDED, generator=g) * 3
    logits[..., VOCAB:] = 40.0  # padding columns that would win every draw if they were allowed
    return logits


def uniforms():
    return label_uniforms(seed=11, hessian_step=2, sample_indices=range(TOKENS[0]), seq_length=TOKENS[1])


def tp_worker(rank, world_size):
    dist.init_process_group("gloo")
    logits, u = full_logits(), uniforms()
    out = {"1": sample_vocab_parallel(logits, u, VOCAB)}
    for tp in (2, 4):
        groups = [dist.new_group(list(range(s, s + tp))) for s in range(0, world_size, tp)]
        group, local = groups[rank // tp], rank % tp
        shard = logits.chunk(tp, dim=-1)[local].contiguous()
        out[str(tp)] = sample_vocab_parallel(shard, u, VOCAB, group)
        sampling.CPU_CHUNK_NUMEL = 700  # chunks of 2-3 rows, cut at other rows than at TP=1
        out[f"{tp} small chunks"] = sample_vocab_parallel(shard, u, VOCAB, group)
        sampling.CPU_CHUNK_NUMEL = CHUNK_NUMEL
    return out


def test_labels_identical_at_tp_1_2_4_and_never_padded():
    results = run_ranks(tp_worker, world_size=4)
    reference = sample_vocab_parallel(full_logits(), uniforms(), VOCAB)
    assert int(reference.max()) < VOCAB
    for rank, out in enumerate(results):
        for tp, labels in out.items():
            assert torch.equal(labels, reference), (rank, tp)


def test_labels_follow_the_softmax():
    """Chi-square of 200k draws from one token's distribution against its probabilities."""
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(16, generator=g) * 1.5
    n = 200_000
    u = torch.rand(n, generator=g, dtype=torch.float64)
    labels = sample_vocab_parallel(logits.expand(n, 16), u, vocab_size=12)
    assert int(labels.max()) < 12
    p = torch.softmax(logits[:12].double(), dim=0)
    counts = torch.bincount(labels, minlength=12).double()
    chi2 = float(((counts - n * p) ** 2 / (n * p)).sum())
    assert chi2 < 32.9  # 11 degrees of freedom, p = 0.0005


def whole_tensor_labels(logits, u, vocab_size):
    """The draw at one rank written out on the whole tensor in float64 (what the chunked code
    must reproduce bit for bit): inverse CDF of exp(x - max) over the real columns."""
    x = logits.double().clone()
    x[..., vocab_size:] = float("-inf")
    cdf = torch.exp(x - x.max(dim=-1).values.unsqueeze(-1)).cumsum(dim=-1)
    labels = torch.searchsorted(cdf, (u * cdf[..., -1]).unsqueeze(-1), right=True).squeeze(-1)
    return labels.clamp(max=vocab_size - 1)


@pytest.mark.parametrize("chunk_numel", [1, 1000, 5000, CHUNK_NUMEL])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_chunked_draw_equals_the_whole_tensor_draw_bit_for_bit(monkeypatch, chunk_numel, dtype):
    monkeypatch.setattr(sampling, "CPU_CHUNK_NUMEL", chunk_numel)
    g = torch.Generator().manual_seed(7)
    for shape, vocab in [((6, 37), PADDED), ((4, 50), VOCAB), ((3, 5), 11)]:
        width = PADDED if vocab > 11 else 16
        logits = (torch.randn(*shape, width, generator=g) * 4).to(dtype)
        logits[0, 1, 2] = float("nan")  # a broken row stays confined to itself
        u = torch.rand(*shape, generator=g, dtype=torch.float64)
        before = logits.clone()
        labels = sample_vocab_parallel(logits, u, vocab)
        assert torch.equal(labels, whole_tensor_labels(logits, u, vocab)), (shape, vocab)
        assert torch.equal(logits.isnan(), before.isnan())
        assert torch.equal(logits.nan_to_num(), before.nan_to_num())  # the logits are left alone
