"""The built-in corpora: real text that a machine can get offline (or from its Debian mirror),
so that training and the benchmarks work without downloading datasets.

`neox-sophia corpus [--source stdlib|gcide] --output-dir DIR` (or `prepare_corpus(...)`) writes

    <source>.jsonl                   one document per line: {"text", <id>} (stdlib: one per .py
                                     file, id "path"; gcide: one per dictionary entry, "headword")
    tokenizer.json                   byte-level BPE trained on it (HFTokenizer; "<|endoftext|>"
                                     is id 0, "<|padding|>" id 1, as in GPT-NeoX's 20B tokenizer)
    <source>_text_document.bin/.idx  the tokenized documents, eod appended (data_path for NeoX
                                     configs: DIR/<source>_text_document)
    corpus.json                      manifest, written last: marks the corpus complete

The sources (neox_sophia.data.sources) are the running interpreter's standard library
(`stdlib`, the default) and GCIDE (`gcide`, English dictionary prose from the Debian package
dict-gcide, fetched with `apt-get download` or read from --source-file). Training the tokenizer
and tokenizing are deterministic (checked: same tokenizer.json and tokens on rerun, any thread
count), so a corpus is a function of its source (Python version; package file) and the
arguments.

Work happens in a temporary directory inside output_dir; files are renamed into place and the
manifest is written last, so an interrupted run never leaves a corpus that looks complete.
A rerun with a complete manifest for the same recipe (source, max_bytes, vocab_size) does
nothing; the manifest records what the text came from (package version, file sha256).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, List, Optional

from neox_sophia.data.preprocess import InputError, TokenizerSpec, preprocess
from neox_sophia.data.sources import SOURCES, CorpusSource
from neox_sophia.data.tokenizers import EOD_TOKEN, PAD_TOKEN

DEFAULT_VOCAB_SIZE = 8192
"""Including the two special tokens. Small: the quickstart model's embedding stays tiny."""
FORMAT_VERSION = 1
"""Bump when the corpus recipe changes, so old outputs are rebuilt instead of reused."""

NAME = "stdlib"
"""The default source."""


@dataclass(frozen=True)
class CorpusPaths:
    """Where the corpus lives; `data_prefix` is the NeoX data_path, `tokenizer` the vocab_file
    (tokenizer_type HFTokenizer)."""

    jsonl: str
    tokenizer: str
    data_prefix: str
    manifest: str


def corpus_paths(output_dir: str | os.PathLike, source: str = NAME) -> CorpusPaths:
    out = Path(output_dir)
    return CorpusPaths(jsonl=str(out / f"{source}.jsonl"), tokenizer=str(out / "tokenizer.json"),
                       data_prefix=str(out / f"{source}_text_document"),
                       manifest=str(out / "corpus.json"))


def read_manifest(output_dir: str | os.PathLike) -> Optional[dict]:
    """The manifest of the corpus in output_dir (None if there is no complete one), with
    "corpus" (the source's name; manifests from before the registry are stdlib's)."""
    try:
        manifest = json.loads((Path(output_dir) / "corpus.json").read_text("utf-8"))
    except (OSError, ValueError):
        return None
    manifest.setdefault("corpus", NAME)
    return manifest


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


def _recipe(source: CorpusSource, max_bytes: int, vocab_size: int) -> dict:
    """What the corpus is a function of; a manifest for another recipe is not reused."""
    return {"format": FORMAT_VERSION, **source.recipe(), "max_bytes": max_bytes, "vocab_size": vocab_size}


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


def _build(source: CorpusSource, paths: CorpusPaths, work: Path, max_bytes: int, vocab_size: int,
           workers: int, source_file: Optional[str], log: Optional[IO[str]]) -> dict:
    """Write jsonl, tokenizer and dataset into `work`; returns counts and provenance for the
    manifest."""
    start = time.perf_counter()
    documents, provenance = source.documents(max_bytes, source_file)
    jsonl = work / os.path.basename(paths.jsonl)
    with open(jsonl, "w", encoding="utf-8") as out:
        for document in documents:
            out.write(json.dumps(document, ensure_ascii=False) + "\n")
    texts = [document["text"] for document in documents]
    text_bytes = sum(len(text.encode("utf-8")) for text in texts)
    _say(log, f"{source.name}: {len(documents)} documents, {text_bytes / 1e6:.1f} MB of text "
              f"({time.perf_counter() - start:.1f} s); training the tokenizer")
    tokenizer = work / os.path.basename(paths.tokenizer)
    train_tokenizer(texts, vocab_size, str(tokenizer))
    del documents, texts
    _say(log, f"tokenizer trained ({time.perf_counter() - start:.1f} s); tokenizing")
    prefix = paths.data_prefix[: -len("_text_document")]
    summary = preprocess([str(jsonl)], str(work / os.path.basename(prefix)), TokenizerSpec("HFTokenizer",
                         str(tokenizer)), append_eod=True, workers=workers,
                         log_interval=10**9, log=log)
    _say(log, f"tokenized {summary.documents:,} documents into {summary.tokens:,} tokens "
              f"({time.perf_counter() - start:.1f} s)")
    return {"documents": summary.documents, "tokens": summary.tokens, "text_bytes": text_bytes,
            "source": provenance}


def prepare_corpus(
    output_dir: str | os.PathLike,
    source: str = NAME,
    *,
    max_bytes: Optional[int] = None,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    workers: int = 1,
    force: bool = False,
    source_file: Optional[str] = None,
    log: Optional[IO[str]] = sys.stderr,
) -> CorpusPaths:
    """Make the corpus of `source` (a name in SOURCES) in `output_dir` unless a complete one for
    the same recipe is there (then return at once). See the module docstring for what is
    written. Call it from one process (rank 0, then a barrier): concurrent builds end with the
    same files, but a reader may see the corpus incomplete meanwhile."""
    spec = SOURCES[source]
    if source_file is not None and not spec.takes_source_file:
        raise InputError(f"--source-file: the {source} corpus reads no source file")
    max_bytes = spec.default_max_bytes if max_bytes is None else max_bytes
    paths = corpus_paths(output_dir, source)
    recipe = _recipe(spec, max_bytes, vocab_size)
    if not force and _is_complete(paths, recipe):
        return paths
    os.makedirs(output_dir, exist_ok=True)
    work = Path(output_dir) / f".tmp-corpus-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        counts = _build(spec, paths, work, max_bytes, vocab_size, workers, source_file, log)
        if os.path.exists(paths.manifest):
            os.remove(paths.manifest)  # from here on the old corpus is no longer complete
        # Index caches that megatron-core keeps next to the data describe the old tokens.
        shutil.rmtree(paths.data_prefix, ignore_errors=True)
        sizes = {}
        for name in os.listdir(work):
            os.replace(work / name, Path(output_dir) / name)
            sizes[name] = os.path.getsize(Path(output_dir) / name)
        manifest = {"corpus": source, "recipe": recipe, "sizes": sizes, **counts}
        tmp = paths.manifest + f".tmp-{os.getpid()}"
        Path(tmp).write_text(json.dumps(manifest, indent=2) + "\n", "utf-8")
        os.replace(tmp, paths.manifest)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return paths


def prepare_builtin_corpus(output_dir: str | os.PathLike, **kwargs) -> CorpusPaths:
    """The default corpus (Python's standard library): prepare_corpus(output_dir, "stdlib", ...)."""
    return prepare_corpus(output_dir, NAME, **kwargs)


def _say(log: Optional[IO[str]], message: str) -> None:
    if log is not None:
        print(f"corpus: {message}", file=log, flush=True)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", choices=sorted(SOURCES), default=NAME,
                        help="; ".join(f"{s.name}: {s.description}" for s in SOURCES.values())
                             + f" (default: {NAME})")
    parser.add_argument("--output-dir", default=None,
                        help="where to write the corpus (default: data/<source>)")
    parser.add_argument("--max-bytes", type=int, default=None,
                        help="cap on the source text taken (default: " + ", ".join(
                            f"{s.name} {s.default_max_bytes:,}" for s in SOURCES.values()) + ")")
    parser.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE,
                        help=f"tokenizer vocabulary, special tokens included "
                             f"(default: {DEFAULT_VOCAB_SIZE})")
    parser.add_argument("--source-file", default=None,
                        help="gcide: read this gcide.dict.dz (or plain dictd text) instead of "
                             "downloading the Debian package dict-gcide")
    parser.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    parser.add_argument("--force", action="store_true", help="rebuild even if complete")


def run(args: argparse.Namespace) -> int:
    """Prepare the corpus; prints the NeoX config keys that use it. Exit code 2 on bad input."""
    if args.vocab_size < 258 or (args.max_bytes is not None and args.max_bytes <= 0):
        print("neox-sophia corpus: error: --vocab-size must be at least 258 (256 bytes + 2 "
              "special tokens) and --max-bytes positive", file=sys.stderr)
        return 2
    source = getattr(args, "source", NAME)
    output_dir = args.output_dir or os.path.join("data", source)
    start = time.perf_counter()
    try:
        paths = prepare_corpus(output_dir, source, max_bytes=args.max_bytes, vocab_size=args.vocab_size,
                               workers=args.workers, force=args.force,
                               source_file=getattr(args, "source_file", None))
    except InputError as err:
        print(f"neox-sophia corpus: error: {err}", file=sys.stderr)
        return 2
    manifest = json.loads(Path(paths.manifest).read_text("utf-8"))
    print(f"corpus ready in {time.perf_counter() - start:.1f} s: {manifest['documents']:,} "
          f"documents, {manifest['tokens']:,} tokens\n"
          f"  data_path: {paths.data_prefix}\n  tokenizer_type: HFTokenizer\n"
          f"  vocab_file: {paths.tokenizer}")
    return 0
