"""The built-in corpus: real text that every Python install ships, so training works offline.

`neox-sophia corpus --output-dir data/stdlib` (or `prepare_builtin_corpus(...)`) writes

    stdlib.jsonl                     one document per standard-library .py file: {"text", "path"}
    tokenizer.json                   byte-level BPE trained on it (HFTokenizer; "<|endoftext|>"
                                     is id 0, "<|padding|>" id 1, as in GPT-NeoX's 20B tokenizer)
    stdlib_text_document.bin/.idx    the tokenized documents, eod appended (data_path for NeoX
                                     configs: <output-dir>/stdlib_text_document)
    corpus.json                      manifest, written last: marks the corpus complete

The source is the running interpreter's standard library (sysconfig's "stdlib" path): *.py
files in sorted order, without test directories, site-packages and build-specific files
(_sysconfigdata*, config-*/), taken while they fit in `max_bytes`. Training the tokenizer and
tokenizing are deterministic (checked: same tokenizer.json and tokens on rerun, any thread
count), so the corpus is a function of the Python version and the arguments.

Work happens in a temporary directory inside output_dir; files are renamed into place and the
manifest is written last, so an interrupted run never leaves a corpus that looks complete.
A rerun with a complete manifest for the same arguments does nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, List, Optional, Tuple

from neox_sophia.data.preprocess import InputError, TokenizerSpec, preprocess
from neox_sophia.data.tokenizers import EOD_TOKEN, PAD_TOKEN

DEFAULT_MAX_BYTES = 32_000_000
"""Cap on the text taken (UTF-8 bytes). CPython 3.11's stdlib without tests is ~12 MB, so the
default takes all of it (~3.2M tokens at vocab 8192)."""
DEFAULT_VOCAB_SIZE = 8192
"""Including the two special tokens. Small: the quickstart model's embedding stays tiny."""
FORMAT_VERSION = 1
"""Bump when the corpus recipe changes, so old outputs are rebuilt instead of reused."""

NAME = "stdlib"
SKIPPED_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


@dataclass(frozen=True)
class CorpusPaths:
    """Where the corpus lives; `data_prefix` is the NeoX data_path, `tokenizer` the vocab_file
    (tokenizer_type HFTokenizer)."""

    jsonl: str
    tokenizer: str
    data_prefix: str
    manifest: str


def corpus_paths(output_dir: str | os.PathLike) -> CorpusPaths:
    out = Path(output_dir)
    return CorpusPaths(jsonl=str(out / f"{NAME}.jsonl"), tokenizer=str(out / "tokenizer.json"),
                       data_prefix=str(out / f"{NAME}_text_document"),
                       manifest=str(out / "corpus.json"))


def stdlib_files(max_bytes: int, root: Optional[str] = None) -> List[Tuple[str, str]]:
    """(path relative to the stdlib, text) of the files taken, in sorted path order.

    A file that would overflow `max_bytes` is left out and smaller later ones still go in, so a
    small cap gives a few whole files rather than a cut one. Files that are not UTF-8 are left
    out (there are none in CPython 3.11 outside the test suite).
    """
    root_path = Path(root or sysconfig.get_paths()["stdlib"])
    taken, total = [], 0
    for path in sorted(root_path.rglob("*.py"), key=lambda p: p.relative_to(root_path).parts):
        rel = path.relative_to(root_path)
        if any(d in SKIPPED_DIRS or d.startswith("config-") for d in rel.parts[:-1]):
            continue
        if rel.name.startswith("_sysconfigdata") or not path.is_file():
            continue  # _sysconfigdata* holds this build's paths and flags: not portable text
        data = path.read_bytes()
        if not data.strip() or total + len(data) > max_bytes:
            continue
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            continue
        taken.append((rel.as_posix(), text))
        total += len(data)
    return taken


def train_tokenizer(texts: List[str], vocab_size: int, path: str) -> None:
    """Byte-level BPE (GPT-2 style: lossless on source code, no unknown tokens), saved as a
    Hugging Face tokenizer.json that build_tokenizer("HFTokenizer", path) reads."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=[EOD_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.save(path)


def _recipe(max_bytes: int, vocab_size: int) -> dict:
    """What the corpus is a function of; a manifest for another recipe is not reused."""
    return {"format": FORMAT_VERSION, "python": platform.python_version(),
            "implementation": sys.implementation.name, "max_bytes": max_bytes,
            "vocab_size": vocab_size}


def _is_complete(paths: CorpusPaths, recipe: dict) -> bool:
    try:
        manifest = json.loads(Path(paths.manifest).read_text("utf-8"))
    except (OSError, ValueError):
        return False
    if manifest.get("recipe") != recipe:
        return False
    sizes = manifest.get("sizes", {})
    files = [paths.jsonl, paths.tokenizer, paths.data_prefix + ".bin", paths.data_prefix + ".idx"]
    return all(os.path.isfile(f) and os.path.getsize(f) == sizes.get(os.path.basename(f))
               for f in files)


def _build(paths: CorpusPaths, work: Path, max_bytes: int, vocab_size: int, workers: int,
           log: Optional[IO[str]]) -> dict:
    """Write jsonl, tokenizer and dataset into `work`; returns counts for the manifest."""
    start = time.perf_counter()
    files = stdlib_files(max_bytes)
    if not files:
        raise InputError(f"no standard-library sources found under "
                         f"{sysconfig.get_paths()['stdlib']} (max_bytes={max_bytes})")
    jsonl = work / os.path.basename(paths.jsonl)
    with open(jsonl, "w", encoding="utf-8") as out:
        for rel, text in files:
            out.write(json.dumps({"text": text, "path": rel}, ensure_ascii=False) + "\n")
    text_bytes = sum(len(text.encode("utf-8")) for _, text in files)
    _say(log, f"{len(files)} files, {text_bytes / 1e6:.1f} MB of text "
              f"({time.perf_counter() - start:.1f} s); training the tokenizer")
    tokenizer = work / os.path.basename(paths.tokenizer)
    train_tokenizer([text for _, text in files], vocab_size, str(tokenizer))
    _say(log, f"tokenizer trained ({time.perf_counter() - start:.1f} s); tokenizing")
    summary = preprocess([str(jsonl)], str(work / NAME), TokenizerSpec("HFTokenizer",
                         str(tokenizer)), append_eod=True, workers=workers,
                         log_interval=10**9, log=log)
    _say(log, f"tokenized {summary.documents:,} documents into {summary.tokens:,} tokens "
              f"({time.perf_counter() - start:.1f} s)")
    return {"documents": summary.documents, "tokens": summary.tokens, "text_bytes": text_bytes}


def prepare_builtin_corpus(
    output_dir: str | os.PathLike,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    workers: int = 1,
    force: bool = False,
    log: Optional[IO[str]] = sys.stderr,
) -> CorpusPaths:
    """Make the built-in corpus in `output_dir` unless a complete one for the same recipe is
    there (then return at once). See the module docstring for what is written. Call it from
    one process (rank 0, then a barrier): concurrent builds end with the same files, but a
    reader may see the corpus incomplete meanwhile."""
    paths = corpus_paths(output_dir)
    recipe = _recipe(max_bytes, vocab_size)
    if not force and _is_complete(paths, recipe):
        return paths
    os.makedirs(output_dir, exist_ok=True)
    work = Path(output_dir) / f".tmp-corpus-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        counts = _build(paths, work, max_bytes, vocab_size, workers, log)
        if os.path.exists(paths.manifest):
            os.remove(paths.manifest)  # from here on the old corpus is no longer complete
        # Index caches that megatron-core keeps next to the data describe the old tokens.
        shutil.rmtree(paths.data_prefix, ignore_errors=True)
        sizes = {}
        for name in os.listdir(work):
            os.replace(work / name, Path(output_dir) / name)
            sizes[name] = os.path.getsize(Path(output_dir) / name)
        manifest = {"recipe": recipe, "sizes": sizes, **counts,
                    "source": sysconfig.get_paths()["stdlib"]}
        tmp = paths.manifest + f".tmp-{os.getpid()}"
        Path(tmp).write_text(json.dumps(manifest, indent=2) + "\n", "utf-8")
        os.replace(tmp, paths.manifest)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return paths


def _say(log: Optional[IO[str]], message: str) -> None:
    if log is not None:
        print(f"corpus: {message}", file=log, flush=True)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output-dir", default="data/stdlib",
                        help="where to write the corpus (default: data/stdlib)")
    parser.add_argument("--max-bytes", type=int, default=DEFAULT_MAX_BYTES,
                        help=f"cap on the source text taken (default: {DEFAULT_MAX_BYTES:,})")
    parser.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE,
                        help=f"tokenizer vocabulary, special tokens included "
                             f"(default: {DEFAULT_VOCAB_SIZE})")
    parser.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    parser.add_argument("--force", action="store_true", help="rebuild even if complete")


def run(args: argparse.Namespace) -> int:
    """Prepare the corpus; prints the NeoX config keys that use it. Exit code 2 on bad input."""
    if args.vocab_size < 258 or args.max_bytes <= 0:
        print("neox-sophia corpus: error: --vocab-size must be at least 258 (256 bytes + 2 "
              "special tokens) and --max-bytes positive", file=sys.stderr)
        return 2
    start = time.perf_counter()
    try:
        paths = prepare_builtin_corpus(args.output_dir, max_bytes=args.max_bytes,
                                       vocab_size=args.vocab_size, workers=args.workers,
                                       force=args.force)
    except InputError as err:
        print(f"neox-sophia corpus: error: {err}", file=sys.stderr)
        return 2
    manifest = json.loads(Path(paths.manifest).read_text("utf-8"))
    print(f"corpus ready in {time.perf_counter() - start:.1f} s: {manifest['documents']:,} "
          f"documents, {manifest['tokens']:,} tokens\n"
          f"  data_path: {paths.data_prefix}\n  tokenizer_type: HFTokenizer\n"
          f"  vocab_file: {paths.tokenizer}")
    return 0
