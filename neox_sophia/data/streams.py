"""Sample streams whose sample i does not depend on how many samples a run asks for.

megatron-core's GPTDataset shuffles all the epochs a request spans together: it concatenates the
document order num_epochs times, shuffles the whole with RandomState(seed), and shuffles the
sample order over all epochs (gpt_dataset._build_document_index, _build_shuffle_index). So once a
run needs more than one epoch, every sample, the first ones included, depends on num_epochs, i.e.
on train_iters: extending a run would change its past. Here each epoch is its own one-epoch
GPTDataset (num_samples=None), epoch e built with seed ``epoch_seed(seed, e)``, and

    sample i of a split = sample (i mod N) of epoch (i div N),   N = samples in one epoch.

Epoch 0 uses the seed itself, so a run within one epoch reads exactly what megatron-core gives
for that seed. Epochs are built when ``ensure`` asks for them (at setup, for the samples the run
needs), on every rank together (rank 0 first, as megatron-core's builder does).

Blends (several prefixes with weights) stay megatron-core's BlendedDataset over such streams:
its greedy schedule assigns sample i from the weights and i alone (each choice depends only on the
earlier ones), so a longer blend only appends.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Callable, Dict, List, Sequence

import torch

EPOCH_SEED_STRIDE = 2654435761  # odd, near 2^32 / golden ratio: epochs' seeds spread over 32 bits


def epoch_seed(seed: int, epoch: int) -> int:
    return seed if epoch == 0 else (seed + epoch * EPOCH_SEED_STRIDE) % 2 ** 32


class EpochSource:
    """The one-epoch datasets (all splits) of one megatron-core build config, one build per epoch."""

    def __init__(self, build_epoch: Callable[[int], list]):
        self._build = build_epoch
        self._epochs: Dict[int, list] = {}

    def epoch(self, e: int) -> list:
        if e not in self._epochs:
            self._epochs[e] = self._build(e)
        return self._epochs[e]


class EpochStream(torch.utils.data.Dataset):
    """Split ``split`` of a source, epoch after epoch (see the module docstring)."""

    def __init__(self, source: EpochSource, split: int, where: str):
        first = source.epoch(0)[split]
        self.source, self.split, self.where = source, split, where
        self.per_epoch = len(first)
        if self.per_epoch == 0:
            from neox_sophia.data.datasets import DataError

            raise DataError(f"{where}: one epoch of this data holds no whole sample of seq_length + 1 tokens; use more "
                            f"data or a shorter seq_length")
        self.index_split = first.index_split  # what megatron-core's BlendedDataset reads
        self.unique_identifiers = OrderedDict(
            [("class", type(self).__name__), ("first_epoch", first.unique_identifiers),
             ("epoch_seed_stride", EPOCH_SEED_STRIDE)])
        self.epochs = [first]

    def ensure(self, samples: int) -> "EpochStream":
        while len(self) < samples:
            self.epochs.append(self.source.epoch(len(self.epochs))[self.split])
        return self

    def __len__(self) -> int:
        return len(self.epochs) * self.per_epoch

    def __getitem__(self, index: int):
        if not 0 <= index < len(self):
            raise IndexError(f"{self.where}: sample {index} is past the {len(self)} samples built; build the "
                             f"dataset with num_samples > {index}")
        epoch, within = divmod(int(index), self.per_epoch)
        return self.epochs[epoch][within]


class Blend(torch.utils.data.Dataset):
    """megatron-core's BlendedDataset over streams, rebuilt longer when more samples are asked for
    (sample i is the same either way)."""

    def __init__(self, streams: Sequence[EpochStream], weights: Sequence[float], build: Callable[..., object]):
        """``build(streams, weights, size)`` makes the BlendedDataset (on every rank)."""
        self.streams, self.weights, self._build = list(streams), [float(w) for w in weights], build
        self.blended, self.size = None, 0

    def ensure(self, samples: int) -> "Blend":
        if samples > self.size:
            total = sum(self.weights)
            for stream, weight in zip(self.streams, self.weights):
                stream.ensure(math.ceil(weight / total * samples) + 1)  # the greedy schedule's most
            self.blended, self.size = self._build(self.streams, self.weights, samples), samples
        return self

    @property
    def dataset_index(self):
        return self.blended.dataset_index

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int):
        return self.blended[index]


def streams_of(builds: List[EpochSource], split: int, wanted: int, where: List[str], weights,
               blend: Callable[..., object]):
    """The dataset of one split: one stream, or a Blend of several, with ``wanted`` samples."""
    streams = [EpochStream(source, split, w) for source, w in zip(builds, where)]
    dataset = streams[0] if len(streams) == 1 else Blend(streams, weights, blend)
    return dataset.ensure(wanted)
