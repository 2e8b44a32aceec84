"""Training data: megatron-core's GPTDataset and BlendedMegatronDatasetBuilder, fed NeoX's keys.

    data_path + split                  one preprocessed prefix, cut into train/valid/test by
                                       documents ("969, 30, 1"), as megatron-core cuts it
    {train,valid,test}_data_paths      separate prefixes per split, each list blended by
      + {train,valid,test}_data_weights  *_data_weights (default 1 each, as NeoX)

Sample i of a split is a function of the files, split, seed, seq_length and i only, never of how
many samples a run asks for (so neither of train_iters nor of the epochs an index was built for):
each epoch is shuffled on its own (neox_sophia.data.streams), megatron-core shuffles documents and
samples with numpy RandomState, and blends with a deterministic greedy schedule (its compiled
`helpers_cpp`, shipped prebuilt in the wheel) in which sample i depends on the weights and i.
Each sample is seq_length + 1 consecutive tokens (documents packed, eod between them when the
data was preprocessed with --append-eod), given as tokens = [:-1], labels = [1:], loss_mask = 1
(NeoX's default: no eod masking).

`batch_for` maps (step, micro_step, dp_rank) to global sample indices so that optimizer step s
always consumes samples [s*B, (s+1)*B), B = micro_batch_size * grad_accum * dp_size, whatever
the layout (docs/design.md, invariant 2). Within a step, micro-step m of rank r reads the micro-batch

    s*B + (m*dp_size + r)*micro_batch_size + [0, micro_batch_size)

i.e. the step's samples in (micro_step, dp_rank) order, the order Megatron-LM's pretraining
sampler uses. Gradients are averaged over the step, so only the step's set of samples matters.

Index caches: megatron-core writes document/sample/shuffle indices to `cache_dir`, or by default
next to the data (<prefix>/cache/GPTDataset_indices/). With torch.distributed initialized,
building is collective: every rank must call build_datasets (rank 0 builds, the others load).
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import struct
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy
import torch

SPLITS = ("train", "valid", "test")
_IDX_HEADER = b"MMIDIDX\x00\x00"
_DTYPES = {1: numpy.uint8, 2: numpy.int8, 3: numpy.int16, 4: numpy.int32, 5: numpy.int64,
           6: numpy.float64, 7: numpy.float32, 8: numpy.uint16}
"""megatron-core's .idx dtype codes (indexed_dataset.DType)."""

FULL_SCAN_TOKENS = 1 << 27
"""Datasets up to this many tokens (256 MB of uint16) are scanned whole for out-of-vocab ids."""
SCAN_WINDOWS, WINDOW_TOKENS = 32, 1 << 16
"""Larger ones are sampled: 32 evenly spaced windows of 64K tokens (first and last included),
a few MB per file. Another tokenizer's ids show up in any window of real text."""


class DataError(ValueError):
    """Bad training data or data keys; the message is one line naming the key and the file."""


# --- checking a preprocessed dataset -----------------------------------------------------------


@dataclass
class DatasetInfo:
    """What a cheap look at one prefix's .idx/.bin tells."""

    prefix: str
    documents: int
    tokens: int
    dtype: type
    fingerprint: str
    """Hash of the .idx head and tail plus both file sizes: changes when the data is remade."""
    sequence_lengths: numpy.ndarray = field(repr=False)
    max_token_id: Optional[int] = None
    scan: str = "none"
    """How max_token_id was found: "full" or "sampled" (see SCAN_WINDOWS)."""


def _missing_message(key: str, prefix: str) -> str:
    hint = ""
    if prefix.endswith((".bin", ".idx")):
        hint = f"; give the prefix without the extension: {prefix[:-4]!r}"
    elif os.path.isfile(prefix + "_text_document.idx"):
        hint = f"; did you mean {prefix + '_text_document'!r}?"
    return (f"{key}: no dataset at prefix {prefix!r} ({prefix}.bin / {prefix}.idx not found); "
            f"make one with `neox-sophia preprocess --output-prefix ...`, which writes "
            f"PREFIX_text_document.bin/.idx{hint}")


def read_index(prefix: str, key: str = "data_path") -> DatasetInfo:
    """Open and sanity-check `prefix`.idx/.bin: present, megatron's format, .bin as long as the
    .idx says (a cut or mismatched file fails here, not deep inside megatron-core)."""
    idx_path, bin_path = prefix + ".idx", prefix + ".bin"
    if not (os.path.isfile(idx_path) and os.path.isfile(bin_path)):
        raise DataError(_missing_message(key, prefix))
    with open(idx_path, "rb") as stream:
        head = stream.read(34)
    if len(head) < 34 or head[:9] != _IDX_HEADER or struct.unpack("<Q", head[9:17])[0] != 1:
        raise DataError(f"{key}: {idx_path} is not a Megatron indexed-dataset index (bad header)")
    code, = struct.unpack("<B", head[17:18])
    if code not in _DTYPES:
        raise DataError(f"{key}: {idx_path} has an unknown token dtype code {code}")
    dtype = _DTYPES[code]
    sequences, documents = struct.unpack("<QQ", head[18:34])
    if os.path.getsize(idx_path) < 34 + sequences * 12 + documents * 8:
        raise DataError(f"{key}: {idx_path} is truncated (an interrupted preprocess?)")
    index = numpy.memmap(idx_path, mode="r", dtype=numpy.uint8)
    lengths = numpy.frombuffer(index, dtype=numpy.int32, count=sequences, offset=34)
    tokens = int(lengths.sum(dtype=numpy.int64))
    expected = tokens * numpy.dtype(dtype).itemsize
    if os.path.getsize(bin_path) != expected:
        raise DataError(f"{key}: {bin_path} has {os.path.getsize(bin_path):,} bytes but its .idx "
                        f"describes {expected:,}: cut short, or not made with this .idx")
    if tokens == 0:
        raise DataError(f"{key}: {prefix} holds no tokens")
    return DatasetInfo(prefix, int(documents) - 1, tokens, dtype,
                       _fingerprint(idx_path, bin_path), lengths)


def _fingerprint(idx_path: str, bin_path: str, edge: int = 1 << 20) -> str:
    size = os.path.getsize(idx_path)
    digest = hashlib.md5(f"{size},{os.path.getsize(bin_path)}".encode(), usedforsecurity=False)
    with open(idx_path, "rb") as stream:
        digest.update(stream.read(edge))
        if size > 2 * edge:
            stream.seek(size - edge)
        digest.update(stream.read())
    return digest.hexdigest()


def scan_max_token_id(info: DatasetInfo) -> DatasetInfo:
    """Largest token id in the .bin: a full scan up to FULL_SCAN_TOKENS, else sampled windows
    (every rank checks every file at start-up, so the Pile's must stay cheap)."""
    tokens = numpy.memmap(info.prefix + ".bin", mode="r", dtype=info.dtype)
    if info.tokens <= FULL_SCAN_TOKENS:
        step = 1 << 24
        info.max_token_id = max(int(tokens[i:i + step].max()) for i in range(0, info.tokens, step))
        info.scan = "full"
    else:
        starts = numpy.linspace(0, info.tokens - WINDOW_TOKENS, SCAN_WINDOWS).astype(numpy.int64)
        info.max_token_id = max(int(tokens[s:s + WINDOW_TOKENS].max()) for s in starts)
        info.scan = "sampled"
    return info


def check_vocab(info: DatasetInfo, vocab_size: int, key: str, tokenizer_name: str = "") -> None:
    """Fail when the data holds ids the tokenizer cannot produce: made with another tokenizer."""
    if info.max_token_id is None:
        scan_max_token_id(info)
    if info.max_token_id >= vocab_size:
        how = "full scan" if info.scan == "full" else f"{SCAN_WINDOWS} sampled windows"
        raise DataError(
            f"{key}: {info.prefix}.bin holds token id {info.max_token_id} ({how}) but the "
            f"tokenizer{' ' + tokenizer_name if tokenizer_name else ''} has {vocab_size} ids: "
            f"the data was made with another tokenizer; preprocess it again with this "
            f"config's tokenizer_type/vocab_file")


# --- from NeoX keys to megatron-core's blends --------------------------------------------------


@dataclass
class _Plan:
    """The blends megatron-core is given, and which key each prefix came from (for errors)."""

    blend: Optional[Tuple[List[str], None]] = None
    blend_per_split: Optional[List[Optional[Tuple[List[str], List[float]]]]] = None
    keys: Dict[str, str] = field(default_factory=dict)


def _plan(data_cfg) -> _Plan:
    """data_path, or per-split paths and weights, checked for the mistakes NeoX users make."""
    per_split = [getattr(data_cfg, f"{s}_data_paths", None) for s in SPLITS]
    if data_cfg.data_path and any(per_split):
        raise DataError("data_path: set either data_path or train/valid/test_data_paths, not both")
    if data_cfg.data_path:
        if not isinstance(data_cfg.data_path, str):
            raise DataError(f"data_path: expected one prefix (a string), got {data_cfg.data_path!r}")
        return _Plan(blend=([data_cfg.data_path], None), keys={data_cfg.data_path: "data_path"})
    if not any(per_split):
        raise DataError("data_path: no training data: set data_path, or train_data_paths, "
                        "valid_data_paths and test_data_paths (run `neox-sophia corpus` for a "
                        "built-in one)")
    plan = _Plan(blend_per_split=[])
    for split, paths in zip(SPLITS, per_split):
        weights = getattr(data_cfg, f"{split}_data_weights", None)
        if not paths:
            if weights:
                raise DataError(f"{split}_data_weights: given without {split}_data_paths")
            plan.blend_per_split.append(None)
            continue
        weights = [1.0] * len(paths) if weights is None else [float(w) for w in weights]
        if len(weights) != len(paths):
            raise DataError(f"{split}_data_weights: {len(weights)} weights for {len(paths)} "
                            f"{split}_data_paths; give one weight per path")
        if any(not w > 0 for w in weights):
            raise DataError(f"{split}_data_weights: weights must be positive (got {weights})")
        plan.blend_per_split.append((list(paths), weights))
        for i, path in enumerate(paths):
            plan.keys.setdefault(path, f"{split}_data_paths[{i}]")
    return plan


def _check_split(info: DatasetInfo, split: str, num_samples: Sequence[int]) -> None:
    """Refuse a split of one data_path that is asked for samples but left with no documents."""
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix, parse_and_normalize_split)

    matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    count = len(info.sequence_lengths)
    for name, bounds, wanted in zip(SPLITS, matrix, num_samples):
        if bounds is None or not wanted:
            continue
        begin, end = (int(round(b * count)) for b in bounds)  # megatron-core's cut, by documents
        if int(info.sequence_lengths[begin:end].sum()) == 0:
            raise DataError(
                f"split: '{split}' leaves the {name} split of {info.prefix} no documents "
                f"({count} in all) but {wanted} {name} samples are needed; give it a larger "
                f"share or use more data")


class _TokenizerView:
    """What megatron-core's GPTDatasetConfig reads from a tokenizer: vocab_size, eod, and
    unique_identifiers, which go into its index-cache key. The cache key does not cover the
    data's content, so the data files' fingerprints go in here: remaking a dataset at the same
    path then never reuses stale indices. No `pad`: megatron-core would mask those labels out,
    which NeoX does not do."""

    def __init__(self, tokenizer, fingerprints: Dict[str, str]):
        self.vocab_size = tokenizer.vocab_size
        try:
            self.eod = tokenizer.eod_id  # read only with eod masking / position resets (off)
        except ValueError:
            self.eod = -1
        self.unique_identifiers = {"class": getattr(tokenizer, "name", type(tokenizer).__name__),
                                   "vocab_size": self.vocab_size, "data": fingerprints}


@contextlib.contextmanager
def _megatron_build_quirks():
    """Two workarounds, for the duration of one build only.

    megatron-core's BlendedDataset calls torch.distributed.get_rank() before writing its index
    cache, which raises when no process group exists: a lone process is rank 0, so say so.
    Without a cache dir it keeps the blend schedule in memory only (milliseconds to rebuild)
    and warns about that on every run: drop that one log line.
    """
    blend_logger = logging.getLogger("megatron.core.datasets.blended_dataset")
    quiet = _DropUncachedBlendWarning()
    blend_logger.addFilter(quiet)
    original = torch.distributed.get_rank
    if not torch.distributed.is_initialized():
        torch.distributed.get_rank = lambda group=None: 0
    try:
        yield
    finally:
        torch.distributed.get_rank = original
        blend_logger.removeFilter(quiet)


class _DropUncachedBlendWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "because path_to_cache is None" not in record.getMessage()


def _build(make: Callable[[], object], cache_dir: Optional[str]):
    """``make()`` (a megatron-core build), with a cache directory that cannot be written as a
    DataError."""
    try:
        with _megatron_build_quirks():
            return make()
    except Exception as err:  # with a process group megatron-core re-raises OSError as Exception
        if not isinstance(err, OSError) and not isinstance(err.__cause__, OSError):
            raise
        where = cache_dir or "next to the data (<prefix>/cache/)"
        raise DataError(f"cannot write the dataset index cache {where}: {err}; pass a writable "
                        f"cache directory") from err


class _Builds:
    """The megatron-core builds of one DataConfig: each blend's one-epoch datasets, epoch by epoch
    (an EpochSource), and megatron-core's BlendedDataset over streams."""

    def __init__(self, plan: _Plan, split: str, seed: int, seq_length: int, tokenizer_view, cache_dir, on_rank):
        self.plan, self.split, self.seed, self.seq_length = plan, split, seed, seq_length
        self.view, self.cache_dir, self.on_rank = tokenizer_view, cache_dir, on_rank

    def config(self, epoch: int, blend=None, blend_per_split=None):
        from megatron.core.datasets.gpt_dataset import GPTDatasetConfig

        from neox_sophia.data.streams import epoch_seed

        return GPTDatasetConfig(
            random_seed=epoch_seed(self.seed, epoch), sequence_length=self.seq_length, blend=blend,
            blend_per_split=blend_per_split, split=self.split if blend is not None else None,
            path_to_cache=self.cache_dir, tokenizer=self.view, reset_position_ids=False, reset_attention_mask=False,
            eod_mask_loss=False, create_attention_mask=False)

    def source(self, **blends):
        """One build per epoch, num_samples None (one epoch) in every split."""
        from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
        from megatron.core.datasets.gpt_dataset import GPTDataset

        from neox_sophia.data.streams import EpochSource

        return EpochSource(lambda e: _build(lambda: BlendedMegatronDatasetBuilder(
            GPTDataset, [None] * 3, self.on_rank, self.config(e, **blends)).build(), self.cache_dir))

    def blend(self, streams, weights, size):  # only per-split paths have weights
        from megatron.core.datasets.blended_dataset import BlendedDataset
        from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder

        return _build(lambda: BlendedMegatronDatasetBuilder.build_generic_dataset(
            BlendedDataset, self.on_rank, True, streams, weights, size,
            self.config(0, blend_per_split=self.plan.blend_per_split)), self.cache_dir)


def build_datasets(
    data_cfg,
    *,
    seq_length: int,
    seed: int,
    num_samples: Tuple[int, int, int],
    tokenizer,
    cache_dir: Optional[str] = None,
    is_built_on_rank: Optional[Callable[[], bool]] = None,
) -> Tuple[Optional[torch.utils.data.Dataset], ...]:
    """(train, valid, test) datasets for a DataConfig; None for a split with no data or no samples
    asked for. num_samples = samples each split must provide at least; sample i is the same
    whatever is asked (neox_sophia.data.streams). Every data file is checked first (present,
    complete, token ids < tokenizer.vocab_size); see the module docstring for order, caching and
    ranks."""
    from neox_sophia.data.streams import streams_of

    if len(num_samples) != 3 or any(n < 0 for n in num_samples):
        raise ValueError(f"num_samples must be three counts >= 0 (got {num_samples})")
    plan = _plan(data_cfg)
    infos = {prefix: read_index(prefix, key) for prefix, key in plan.keys.items()}
    for prefix, info in infos.items():
        check_vocab(info, tokenizer.vocab_size, plan.keys[prefix], getattr(tokenizer, "name", ""))
    split = "".join(data_cfg.split.split())  # "969, 30, 1" and "969,30,1" share a cache entry
    view = _TokenizerView(tokenizer, {p: i.fingerprint for p, i in infos.items()})
    builds = _Builds(plan, split, seed, seq_length, view, cache_dir, is_built_on_rank or (lambda: True))
    out: List[Optional[torch.utils.data.Dataset]] = [None, None, None]
    if plan.blend is not None:
        prefix = plan.blend[0][0]
        _check_split(infos[prefix], split, num_samples)
        whole = builds.source(blend=plan.blend)
        for i, wanted in enumerate(num_samples):
            if wanted:
                out[i] = streams_of([whole], i, wanted, [f"{plan.keys[prefix]} ({SPLITS[i]} split)"], None,
                                    builds.blend)
        return tuple(out)
    for i, entry in enumerate(plan.blend_per_split):
        if entry is None or not num_samples[i]:
            continue
        paths, weights = entry
        sources = [builds.source(blend_per_split=[([p], None) if j == i else None for j in range(3)]) for p in paths]
        out[i] = streams_of(sources, i, num_samples[i], [plan.keys.get(p, p) for p in paths], weights, builds.blend)
    return tuple(out)


# --- batches -----------------------------------------------------------------------------------


def sample_indices(step: int, micro_step: int, dp_rank: int, dp_size: int,
                   micro_batch_size: int, grad_accum: int) -> range:
    """Global sample indices of one rank's micro-batch (layout in the module docstring)."""
    if not (0 <= micro_step < grad_accum and 0 <= dp_rank < dp_size and step >= 0
            and micro_batch_size > 0):
        raise ValueError(f"bad batch position: step={step}, micro_step={micro_step} of "
                         f"{grad_accum}, dp_rank={dp_rank} of {dp_size}, micro={micro_batch_size}")
    global_batch = micro_batch_size * grad_accum * dp_size
    start = step * global_batch + (micro_step * dp_size + dp_rank) * micro_batch_size
    return range(start, start + micro_batch_size)


def batch_for(dataset, step: int, micro_step: int, dp_rank: int, dp_size: int,
              micro_batch_size: int, grad_accum: int, *,
              vocab_size: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """One rank's micro-batch: tokens, labels (int64) and loss_mask (float32), each
    [micro_batch_size, seq_length]. With vocab_size, ids >= vocab_size are an error (a cheap
    per-batch guard behind build_datasets' sampled scan of very large files)."""
    indices = sample_indices(step, micro_step, dp_rank, dp_size, micro_batch_size, grad_accum)
    if indices.stop > len(dataset):
        raise IndexError(
            f"step {step} needs sample {indices.stop - 1} but the dataset has {len(dataset)} "
            f"samples: build it with num_samples >= steps * global batch size")
    samples = [dataset[i] for i in indices]
    batch = {key: torch.stack([sample[key] for sample in samples])
             for key in ("tokens", "labels", "loss_mask")}
    if vocab_size is not None:
        top = int(torch.maximum(batch["tokens"].max(), batch["labels"].max()))
        if top >= vocab_size:
            raise DataError(f"samples {indices.start}..{indices.stop - 1} hold token id {top} >= "
                            f"the tokenizer's {vocab_size} ids: data made with another tokenizer")
    return batch
