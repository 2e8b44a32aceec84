"""`neox-sophia preprocess`: jsonl (plain, .zst or .gz) -> Megatron indexed dataset (.bin/.idx).

Takes GPT-NeoX's tools/datasets/preprocess_data.py arguments, so existing command lines work:

    neox-sophia preprocess --input A.jsonl,B.jsonl.zst --jsonl-keys text \\
        --tokenizer-type HFTokenizer --vocab-file 20B_tokenizer.json --append-eod \\
        --output-prefix data/pile --dataset-impl mmap --workers 8 [--ftfy] [--num-docs N]

--ftfy repairs mojibake and other Unicode damage with the ftfy package (an optional install)
before tokenizing; --num-docs (the number of input documents, when known) turns the progress
display into a bar with an ETA, as in NeoX; --dataset-impl mmap is accepted and changes nothing
(the memory-mapped indexed format is the one written; NeoX's lazy/cached are refused).

writes `data/pile_text_document.bin/.idx` (one pair per jsonl key: `{prefix}_{key}_document`) with
megatron-core's IndexedDatasetBuilder, so megatron-core's GPTDataset reads them. Each non-empty
document becomes one sequence (its ids, then the eod id with --append-eod); documents whose text
tokenizes to nothing are skipped and counted. Token dtype: uint16 when the vocabulary fits
(< 65500 ids), else int32 (megatron-core's DType.optimal_dtype, the rule NeoX also uses).

Outputs are written under temporary names and renamed at the end (.idx last), so an interrupted
run never leaves a dataset that looks complete. Bad input stops the run with exit code 2 and one
line naming the file (and line): a missing input, invalid JSON, a missing key, a bad tokenizer.
"""
from __future__ import annotations

import argparse
import contextlib
import gzip
import io
import json
import multiprocessing
import os
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import IO, Deque, Iterator, List, Optional, Sequence, Tuple

import numpy

from neox_sophia.data.progress import Progress
from neox_sophia.data.tokenizers import TOKENIZER_ERRORS, TOKENIZERS, Tokenizer, build_tokenizer

BATCH_LINES = 64
"""Lines per task sent to a worker: large enough to amortize pickling, small enough to keep
every worker busy on small inputs."""


class InputError(Exception):
    """Bad input: the message is one line that names the file (and line). Exit code 2."""


@dataclass(frozen=True)
class TokenizerSpec:
    """What a worker process needs to build its own copy of the tokenizer."""

    tokenizer_type: str
    vocab_file: Optional[str]
    merge_file: Optional[str] = None

    def build(self) -> Tokenizer:
        return build_tokenizer(self.tokenizer_type, self.vocab_file, self.merge_file)


@dataclass
class Summary:
    """What one preprocess run did (printed at the end, returned to callers such as corpus)."""

    documents: int = 0
    empty: int = 0
    tokens: int = 0
    seconds: float = 0.0
    outputs: List[str] = field(default_factory=list)
    """The dataset prefixes written, one per jsonl key."""


def output_prefix_for(output_prefix: str, key: str) -> str:
    """The prefix NeoX gives the dataset of one jsonl key: `{prefix}_{key}_document`."""
    return f"{output_prefix}_{key}_document"


# --- reading -----------------------------------------------------------------------------------


class _ZstdReader(io.RawIOBase):
    """Decompresses every frame of a .zst file in turn (the Pile's files are concatenated
    frames) and raises EOFError when the file ends inside a frame: zstandard's stream_reader
    would end a cut file silently, losing its tail without a word."""

    def __init__(self, raw: IO[bytes]):
        import zstandard  # a runtime dependency; imported here so plain jsonl needs nothing

        self._raw, self._dctx, self._frame = raw, zstandard.ZstdDecompressor(), None
        self._pending, self._offset = b"", 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while self._offset == len(self._pending):
            chunk = self._raw.read(1 << 20)
            if not chunk:
                if self._frame is not None and not self._frame.eof:
                    raise EOFError("the file ends inside a zstd frame (cut short?)")
                return 0
            self._pending, self._offset = self._decompress(chunk), 0
        count = min(len(buffer), len(self._pending) - self._offset)
        buffer[:count] = self._pending[self._offset:self._offset + count]
        self._offset += count
        return count

    def _decompress(self, chunk: bytes) -> bytes:
        out = []
        while chunk:
            if self._frame is None or self._frame.eof:
                self._frame = self._dctx.decompressobj()
            out.append(self._frame.decompress(chunk))
            chunk = self._frame.unused_data if self._frame.eof else b""
        return b"".join(out)

    def close(self) -> None:
        self._raw.close()
        super().close()


def _open_binary(path: str) -> IO[bytes]:
    """A streaming binary reader for plain, zstd- or gzip-compressed files (by extension).

    Lines are decoded one at a time later (in the workers), so a UTF-8 error names its line.
    """
    raw = open(path, "rb")
    if path.endswith(".zst"):
        return io.BufferedReader(_ZstdReader(raw), buffer_size=1 << 20)
    if path.endswith(".gz"):
        return gzip.GzipFile(fileobj=raw)
    return raw


def iter_lines(paths: Sequence[str]) -> Iterator[Tuple[str, int, bytes]]:
    """(file, line number, raw line) for every non-blank line of every input, in order.

    A corrupt compressed stream becomes InputError naming the file and the last good line.
    """
    for path in paths:
        line_no = 0
        try:
            with _open_binary(path) as stream:
                for line_no, line in enumerate(stream, start=1):
                    if line.strip():
                        yield path, line_no, line
        except (OSError, EOFError) as err:  # gzip: BadGzipFile (OSError), EOFError if truncated
            raise InputError(f"{path}: cannot read after line {line_no}: {err}") from None
        except Exception as err:
            if type(err).__name__ != "ZstdError":  # zstandard's errors derive from Exception
                raise
            raise InputError(f"{path}: not a valid zstd stream after line {line_no}: {err}"
                             ) from None


def check_inputs(paths: Sequence[str]) -> None:
    """Fail early (before any worker starts) on inputs that are missing or unreadable."""
    if not paths:
        raise InputError("--input: no input files given")
    for path in paths:
        if not os.path.isfile(path):
            raise InputError(f"{path}: no such input file")
        if not os.access(path, os.R_OK):
            raise InputError(f"{path}: cannot read input file (permission denied)")


# --- encoding (runs in the workers) ------------------------------------------------------------

_worker_tokenizer: Optional[Tokenizer] = None
_worker_keys: Tuple[str, ...] = ()
_worker_eod: Optional[int] = None
_worker_dtype: type = numpy.int32
_worker_fix_text = None


def _init_worker(spec: TokenizerSpec, keys: Tuple[str, ...], append_eod: bool, dtype, ftfy: bool = False) -> None:
    """Pool initializer: each worker builds its own tokenizer once (tokenizers don't pickle)."""
    global _worker_tokenizer, _worker_keys, _worker_eod, _worker_dtype, _worker_fix_text
    _worker_tokenizer = spec.build()
    _worker_keys = keys
    _worker_eod = _worker_tokenizer.eod_id if append_eod else None
    _worker_dtype = dtype
    _worker_fix_text = fix_text_function() if ftfy else None


def fix_text_function():
    """ftfy.fix_text (what NeoX's --ftfy applies to each document), or InputError saying how to
    install it: ftfy is an optional dependency."""
    try:
        import ftfy
    except ImportError:
        raise InputError("--ftfy needs the ftfy package, which is not installed: pip install ftfy") from None
    return ftfy.fix_text


def _texts_of(path: str, line_no: int, line: bytes) -> List[str]:
    """The text under each jsonl key of one line, or InputError naming file:line."""
    where = f"{path}:{line_no}"
    try:
        record = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise InputError(f"{where}: not UTF-8 ({err.reason} at byte {err.start})") from None
    except json.JSONDecodeError as err:
        raise InputError(f"{where}: invalid JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(record, dict):
        raise InputError(f"{where}: expected a JSON object, got {type(record).__name__}")
    texts = []
    for key in _worker_keys:
        if key not in record:
            present = ", ".join(repr(k) for k in list(record)[:10]) or "none"
            raise InputError(f"{where}: no key {key!r} (--jsonl-keys); keys present: {present}")
        value = record[key]
        if not isinstance(value, str):
            raise InputError(f"{where}: {key!r} is {type(value).__name__}, not a string")
        texts.append(_worker_fix_text(value) if _worker_fix_text else value)
    return texts


def encode_lines(batch: List[Tuple[str, int, bytes]]) -> List[List[numpy.ndarray]]:
    """For each key, the token arrays of the batch's documents (eod appended when asked).

    Empty documents give an empty array; the writer skips them. The tokenizer's native batch
    path is used per key, so the result does not depend on how lines are batched.
    """
    texts_per_line = [_texts_of(*item) for item in batch]
    per_key = []
    for k in range(len(_worker_keys)):
        ids = _worker_tokenizer.encode_batch([texts[k] for texts in texts_per_line])
        arrays = []
        for doc in ids:
            if doc and _worker_eod is not None:
                doc = list(doc) + [_worker_eod]
            arrays.append(numpy.asarray(doc, dtype=_worker_dtype))
        per_key.append(arrays)
    return per_key


def _batches(lines: Iterator[Tuple[str, int, bytes]], size: int) -> Iterator[list]:
    batch = []
    for item in lines:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


# --- writing -----------------------------------------------------------------------------------


def token_dtype(vocab_size: int) -> type:
    """The .bin token dtype for a vocabulary: uint16 below 65500 ids, else int32."""
    from megatron.core.datasets.indexed_dataset import DType

    return DType.optimal_dtype(vocab_size)


class _DatasetWriter:
    """One IndexedDatasetBuilder per jsonl key, writing to temporary names until commit()."""

    def __init__(self, prefixes: List[str], dtype: type):
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

        self.prefixes = prefixes
        self.suffix = f".tmp-{os.getpid()}"
        for prefix in prefixes:
            os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
        self.builders = [IndexedDatasetBuilder(p + ".bin" + self.suffix, dtype=dtype)
                         for p in prefixes]

    def add(self, per_key: List[List[numpy.ndarray]], summary: Summary) -> None:
        """Append one batch; counts documents (once, by the first key's) and tokens (all keys)."""
        for k, (builder, docs) in enumerate(zip(self.builders, per_key)):
            for doc in docs:
                if k == 0:
                    summary.documents += 1
                    summary.empty += doc.size == 0
                if doc.size:
                    builder.add_document(doc, [doc.size])
                    summary.tokens += doc.size

    def commit(self) -> None:
        """Write the .idx files, then rename .bin and .idx into place (.idx last)."""
        for prefix, builder in zip(self.prefixes, self.builders):
            builder.finalize(prefix + ".idx" + self.suffix)
        for prefix in self.prefixes:
            os.replace(prefix + ".bin" + self.suffix, prefix + ".bin")
            os.replace(prefix + ".idx" + self.suffix, prefix + ".idx")

    def discard(self) -> None:
        for prefix, builder in zip(self.prefixes, self.builders):
            builder.data_file.close()
            for ext in (".bin", ".idx"):
                if os.path.exists(prefix + ext + self.suffix):
                    os.remove(prefix + ext + self.suffix)


# --- the whole run -----------------------------------------------------------------------------


def _encoded_batches(lines, spec, keys, append_eod, dtype, workers, ftfy=False):
    """Encoded batches in input order, so the output does not depend on the number of workers.

    workers <= 1 encodes in this process. Otherwise a pool gets at most 4 batches per worker
    ahead of the writer: Pool.imap would read the whole input into its task queue.
    """
    batches = _batches(lines, BATCH_LINES)
    if workers <= 1:
        _init_worker(spec, keys, append_eod, dtype, ftfy)
        yield from map(encode_lines, batches)
        return
    context = multiprocessing.get_context("fork" if os.name == "posix" else "spawn")
    with _tokenizers_parallelism_off(), \
            context.Pool(workers, _init_worker, (spec, keys, append_eod, dtype, ftfy)) as pool:
        pending: Deque = deque()
        for batch in batches:
            pending.append(pool.apply_async(encode_lines, (batch,)))
            if len(pending) >= 4 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


@contextlib.contextmanager
def _tokenizers_parallelism_off():
    """Forked workers each run one tokenizer thread (N workers already use N cores); setting
    the variable before the fork also stops HF tokenizers' "process just got forked" warning
    when this process used its thread pool before (as corpus does, training its tokenizer)."""
    saved = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = saved


def preprocess(
    inputs: Sequence[str],
    output_prefix: str,
    spec: TokenizerSpec,
    *,
    jsonl_keys: Sequence[str] = ("text",),
    append_eod: bool = False,
    workers: int = 1,
    log_interval: int = 1000,
    log: Optional[IO[str]] = sys.stderr,
    ftfy: bool = False,
    num_docs: Optional[int] = None,
) -> Summary:
    """Tokenize jsonl documents into one indexed dataset per key; see the module docstring.
    ``ftfy``: repair each text with ftfy.fix_text first; ``num_docs``: the expected number of
    documents, for the progress bar only (as NeoX).

    Raises InputError (one line, naming the file) for bad input or a bad tokenizer file.
    """
    check_inputs(inputs)
    if ftfy:
        fix_text_function()  # installed? say so now, not in a worker
    try:
        tokenizer = spec.build()
        if append_eod:
            _ = tokenizer.eod_id  # fail now, naming the tokenizer file, not in a worker
    except TOKENIZER_ERRORS as err:
        raise InputError(str(err)) from None
    dtype = token_dtype(tokenizer.vocab_size)
    keys = tuple(jsonl_keys)
    summary = Summary(outputs=[output_prefix_for(output_prefix, key) for key in keys])
    try:
        writer = _DatasetWriter(summary.outputs, dtype)
    except OSError as err:
        raise InputError(f"{summary.outputs[0]}.bin: cannot write output ({err.strerror})"
                         ) from None
    progress = Progress(log, log_interval, num_docs)
    batches = _encoded_batches(iter_lines(inputs), spec, keys, append_eod, dtype, workers, ftfy)
    try:
        for per_key in batches:
            writer.add(per_key, summary)
            progress.update(summary)
        writer.commit()
    except BaseException:
        writer.discard()
        raise
    finally:
        batches.close()  # stops the worker pool now, also when the writer failed
        progress.close()
    summary.seconds = time.perf_counter() - progress.start
    return summary


def format_summary(summary: Summary) -> str:
    rate = summary.tokens / max(summary.seconds, 1e-9)
    files = ", ".join(f"{p}.bin/.idx" for p in summary.outputs)
    empty = f" ({summary.empty:,} empty, skipped)" if summary.empty else ""
    return (f"preprocess: done: {summary.documents:,} documents{empty}, {summary.tokens:,} tokens "
            f"in {summary.seconds:.1f} s ({rate:,.0f} tokens/s); wrote {files}")


# --- command line ------------------------------------------------------------------------------


# NeoX's --dataset-impl choices: mmap is what is written here; lazy and cached are older formats
DATASET_IMPLS = {"mmap": None, "lazy": "an older Megatron format", "cached": "an older Megatron format"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """GPT-NeoX preprocess_data.py's arguments, all of them."""
    types = ", ".join(sorted(cls.name for cls in TOKENIZERS.values()))
    parser.add_argument("--input", required=True,
                        help="comma-separated jsonl files (.jsonl, .jsonl.zst or .jsonl.gz)")
    parser.add_argument("--jsonl-keys", nargs="+", default=["text"],
                        help="keys whose text to tokenize, one dataset each (default: text)")
    parser.add_argument("--num-docs", type=int,
                        help="number of documents in the input, if known: a progress bar with the time left")
    parser.add_argument("--tokenizer-type", required=True,
                        help=f"{types} (any case, as NeoX)")
    parser.add_argument("--vocab-file", help="tokenizer.json, vocab.json or .model file (HFGPT2Tokenizer: a "
                                             "directory or Hub name; TiktokenTokenizer: an encoding name)")
    parser.add_argument("--merge-file", help="merges.txt (GPT2BPETokenizer)")
    parser.add_argument("--append-eod", action="store_true",
                        help="append the end-of-document token to every document")
    parser.add_argument("--ftfy", action="store_true",
                        help="repair Unicode (mojibake...) with ftfy.fix_text before tokenizing (pip install ftfy)")
    parser.add_argument("--output-prefix", required=True,
                        help="writes PREFIX_{key}_document.bin/.idx")
    parser.add_argument("--dataset-impl", choices=sorted(DATASET_IMPLS),
                        help="accepted for NeoX's command lines: mmap is the format written (a no-op)")
    parser.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    parser.add_argument("--log-interval", type=int, default=1000,
                        help="documents between progress lines when stderr is not a terminal")


def run(args: argparse.Namespace) -> int:
    """Run from parsed arguments; returns the exit code (2 for bad input, one line on stderr)."""
    impl = getattr(args, "dataset_impl", None)
    if DATASET_IMPLS.get(impl):
        print(f"neox-sophia preprocess: error: --dataset-impl {impl}: {DATASET_IMPLS[impl]}, not written here; "
              f"use mmap (megatron-core's indexed dataset, what training reads)", file=sys.stderr)
        return 2
    if impl == "mmap":
        print("neox-sophia preprocess: --dataset-impl mmap: accepted, changes nothing (mmap is the only "
              "format written)", file=sys.stderr)
    inputs = [path.strip() for path in args.input.split(",") if path.strip()]
    spec = TokenizerSpec(args.tokenizer_type, args.vocab_file, args.merge_file)
    try:
        summary = preprocess(inputs, args.output_prefix, spec, jsonl_keys=args.jsonl_keys,
                             append_eod=args.append_eod, workers=args.workers,
                             log_interval=args.log_interval, ftfy=getattr(args, "ftfy", False),
                             num_docs=getattr(args, "num_docs", None))
    except InputError as err:
        print(f"neox-sophia preprocess: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("neox-sophia preprocess: interrupted; no output written", file=sys.stderr)
        return 130
    print(format_summary(summary), file=sys.stderr)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="neox-sophia preprocess",
                                     description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
