"""Data pipeline: preprocess (jsonl/zst -> .bin/.idx), the built-in corpus, megatron-core
datasets and the layout-invariant batch order. Tokenizers are trained here, offline, on a few
standard-library modules (as in test_tokenizers.py)."""
import argparse
import difflib
import gzip
import hashlib
import inspect
import io
import json
import os
import string
import subprocess
import textwrap
from pathlib import Path

import numpy
import pytest
import sentencepiece
import torch
import zstandard
from tokenizers import ByteLevelBPETokenizer

from neox_sophia.config.sections import DataConfig
from neox_sophia.data import corpus, preprocess, progress, sources
from neox_sophia.data.datasets import (DataError, batch_for, build_datasets, read_index,
                                       sample_indices)
from neox_sophia.data.tokenizers import build_tokenizer

pytestmark = [pytest.mark.filterwarnings("ignore:Transformer Engine and Apex"),  # megatron-core
              pytest.mark.filterwarnings("ignore:The following imports from"),
              pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated")]

EOD = "<|endoftext|>"
SOURCES = [inspect.getsource(m) for m in (textwrap, difflib, string, argparse)]


def _documents(count, seed):
    """Slices of stdlib sources; one empty, one with non-ASCII text."""
    text = "".join(SOURCES)
    docs = [text[(i * 997 + seed) % 50_000:][: 200 + (i * 37) % 900] for i in range(count)]
    docs[3] = ""
    docs[5] += "\n# naïve café — ✓ 🙂\n"
    return docs


def _write_jsonl(path, docs, **extra):
    lines = [json.dumps({"text": d, "meta": i, **extra}) for i, d in enumerate(docs)]
    data = ("\n".join(lines) + "\n").encode("utf-8")
    if str(path).endswith(".zst"):
        data = zstandard.ZstdCompressor().compress(data)
    Path(path).write_bytes(data)
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A byte-level BPE (vocab 400, eod special) and two jsonl inputs, one zstd-compressed."""
    d = tmp_path_factory.mktemp("data")
    trained = ByteLevelBPETokenizer()
    trained.train_from_iterator(SOURCES, vocab_size=400, min_frequency=2, special_tokens=[EOD],
                                show_progress=False)
    trained.save(str(d / "tok.json"))
    trained.save_model(str(d))  # vocab.json + merges.txt for GPT2BPETokenizer
    docs_a, docs_b = _documents(120, 0), _documents(80, 7)
    return {"dir": d, "tokenizer": str(d / "tok.json"), "docs": docs_a + docs_b,
            "vocab.json": str(d / "vocab.json"), "merges.txt": str(d / "merges.txt"),
            "a": _write_jsonl(d / "a.jsonl", docs_a), "b": _write_jsonl(d / "b.jsonl.zst", docs_b)}


def _preprocess(files, out, *extra):
    parser = argparse.ArgumentParser()
    preprocess.add_arguments(parser)
    args = parser.parse_args(["--input", f"{files['a']},{files['b']}", "--tokenizer-type",
                              "HFTokenizer", "--vocab-file", files["tokenizer"],
                              "--output-prefix", str(out), "--log-interval", "50", *extra])
    return preprocess.run(args)


def _read_documents(prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(str(prefix))
    return dataset, [dataset[i].tolist() for i in range(len(dataset))]


# --- preprocess --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dataset_prefix(files):
    """The two inputs preprocessed with --append-eod, 2 workers."""
    out = files["dir"] / "out" / "mix"
    assert _preprocess(files, out, "--append-eod", "--workers", "2") == 0
    return str(out) + "_text_document"


@pytest.mark.parametrize("append_eod", [True, False])
def test_preprocess_round_trip_plain_and_zst(files, dataset_prefix, tmp_path, capsys, append_eod):
    tok = build_tokenizer("HFTokenizer", files["tokenizer"])
    if append_eod:
        prefix = dataset_prefix
    else:
        assert _preprocess(files, tmp_path / "p") == 0
        prefix = tmp_path / "p_text_document"
    dataset, stored = _read_documents(prefix)
    eod = [tok.eod_id] if append_eod else []
    expected = [tok.encode(d) + eod for d in files["docs"] if d]  # empty documents are skipped
    assert stored == expected
    assert dataset.index.dtype.__name__ == "uint16"  # vocab 400 fits
    err = capsys.readouterr().err
    if not append_eod:
        assert "200 documents (2 empty, skipped)" in err
        assert "tokens/s" in err and "p_text_document.bin/.idx" in err


def test_workers_do_not_change_the_output(files, dataset_prefix, tmp_path):
    assert _preprocess(files, tmp_path / "one", "--append-eod", "--workers", "1") == 0
    for ext in (".bin", ".idx"):
        assert Path(f"{tmp_path}/one_text_document{ext}").read_bytes() == \
            Path(dataset_prefix + ext).read_bytes()
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]


@pytest.mark.parametrize("kind", ["GPT2BPETokenizer", "SPMTokenizer"])
def test_preprocess_with_the_other_tokenizer_types(files, tmp_path, kind):
    if kind == "GPT2BPETokenizer":
        spec = preprocess.TokenizerSpec(kind, files["vocab.json"], files["merges.txt"])
    else:
        model = io.BytesIO()
        lines = [line for text in SOURCES for line in text.splitlines() if line.strip()]
        sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model,
                                                 vocab_size=200, minloglevel=2)
        (tmp_path / "spm.model").write_bytes(model.getvalue())
        spec = preprocess.TokenizerSpec(kind, str(tmp_path / "spm.model"))
    tok = spec.build()
    summary = preprocess.preprocess([files["a"]], str(tmp_path / "t"), spec, append_eod=True,
                                    workers=2, log=None)
    encoded = [tok.encode(d) for d in files["docs"][:120]]
    assert _read_documents(summary.outputs[0])[1] == [ids + [tok.eod_id] for ids in encoded if ids]


def test_several_jsonl_keys_give_one_dataset_each(files, tmp_path):
    path = tmp_path / "k.jsonl"
    path.write_text(json.dumps({"text": "def f(x):\n", "title": "Title"}) + "\n" +
                    json.dumps({"text": "x = 1\n", "title": "Other"}) + "\n")
    tok = build_tokenizer("HFTokenizer", files["tokenizer"])
    spec = preprocess.TokenizerSpec("HFTokenizer", files["tokenizer"])
    summary = preprocess.preprocess([str(path)], str(tmp_path / "k"), spec,
                                    jsonl_keys=["text", "title"], log=None)
    assert summary.documents == 2 and summary.outputs == [str(tmp_path / "k_text_document"),
                                                          str(tmp_path / "k_title_document")]
    assert _read_documents(tmp_path / "k_title_document")[1] == [tok.encode("Title"),
                                                                   tok.encode("Other")]


@pytest.mark.parametrize("case", ["missing_input", "bad_json", "missing_key", "not_string",
                                  "bad_tokenizer", "bad_zstd", "cut_zstd"])
def test_bad_input_is_one_line_naming_the_file(files, tmp_path, capsys, case):
    good = files["a"]
    path = tmp_path / "in.jsonl"
    lines = [json.dumps({"text": "a"}), json.dumps({"text": "b"})]
    tokenizer = files["tokenizer"]
    if case == "missing_input":
        path = tmp_path / "nope.jsonl"
    elif case == "bad_json":
        path.write_text("\n".join(lines + ['{"text": "c"']) + "\n")
    elif case == "missing_key":
        path.write_text("\n".join(lines + [json.dumps({"body": "c"})]) + "\n")
    elif case == "not_string":
        path.write_text("\n".join(lines + [json.dumps({"text": 3})]) + "\n")
    elif case == "bad_tokenizer":
        path, tokenizer = Path(good), str(tmp_path / "tok.json")
        Path(tokenizer).write_text("{not json")
    elif case == "bad_zstd":
        path = tmp_path / "in.jsonl.zst"
        path.write_bytes(b"this is not zstd" * 10)
    elif case == "cut_zstd":
        path = tmp_path / "in.jsonl.zst"
        path.write_bytes(zstandard.ZstdCompressor().compress("\n".join(lines).encode())[:-4])
    parser = argparse.ArgumentParser()
    preprocess.add_arguments(parser)
    code = preprocess.run(parser.parse_args([
        "--input", str(path), "--tokenizer-type", "HFTokenizer", "--vocab-file", tokenizer,
        "--output-prefix", str(tmp_path / "o"), "--workers", "2"]))
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    named = tokenizer if case == "bad_tokenizer" else str(path)
    assert named in err
    line = {"bad_json": ":3:", "missing_key": ":3:", "not_string": ":3:"}.get(case)
    assert line is None or f"{path}{line}" in err
    assert not [p for p in os.listdir(tmp_path) if p.startswith("o_")]  # nothing half-written


def _cli(*argv):
    parser = argparse.ArgumentParser()
    preprocess.add_arguments(parser)
    return preprocess.run(parser.parse_args([str(a) for a in argv]))


def test_neox_readme_command_line_works_and_says_mmap_is_a_no_op(files, tmp_path, capsys):
    """The command of GPT-NeoX's README, argument for argument (--vocab is argparse's prefix of
    --vocab-file there too), plus --num-docs and --log-interval."""
    code = _cli("--input", files["b"], "--output-prefix", tmp_path / "mydataset", "--vocab", files["vocab.json"],
                "--merge-file", files["merges.txt"], "--dataset-impl", "mmap", "--tokenizer-type", "GPT2BPETokenizer",
                "--append-eod", "--num-docs", "80", "--log-interval", "20")
    err = capsys.readouterr().err.splitlines()
    assert code == 0
    assert [line for line in err if "--dataset-impl" in line] == [
        "neox-sophia preprocess: --dataset-impl mmap: accepted, changes nothing (mmap is the only format written)"]
    tok = build_tokenizer("GPT2BPETokenizer", files["vocab.json"], files["merges.txt"])
    expected = [tok.encode(d) + [tok.eod_id] for d in files["docs"][120:] if d]
    assert _read_documents(tmp_path / "mydataset_text_document")[1] == expected


def test_other_dataset_impls_are_refused_in_one_line(files, tmp_path, capsys):
    code = _cli("--input", files["a"], "--output-prefix", tmp_path / "x", "--tokenizer-type", "HFTokenizer",
                "--vocab-file", files["tokenizer"], "--dataset-impl", "cached")
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "--dataset-impl cached" in err and "use mmap" in err


def test_ftfy_repairs_text_before_tokenizing(files, tmp_path):
    ftfy = pytest.importorskip("ftfy")
    broken = ["The cafÃ© is naÃ¯ve", "plain text", "â€œquotedâ€\x9d"]
    path = _write_jsonl(tmp_path / "m.jsonl", broken)
    tok = build_tokenizer("HFTokenizer", files["tokenizer"])
    assert _cli("--input", path, "--output-prefix", tmp_path / "f", "--tokenizer-type", "HFTokenizer",
                "--vocab-file", files["tokenizer"], "--ftfy", "--workers", "2") == 0
    fixed = [ftfy.fix_text(t) for t in broken]
    assert fixed[0] == "The café is naïve"
    assert _read_documents(tmp_path / "f_text_document")[1] == [tok.encode(t) for t in fixed]


def test_ftfy_not_installed_is_one_line(files, tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "ftfy", None)  # as if not installed
    code = _cli("--input", files["a"], "--output-prefix", tmp_path / "f", "--tokenizer-type", "HFTokenizer",
                "--vocab-file", files["tokenizer"], "--ftfy")
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == ("neox-sophia preprocess: error: --ftfy needs the ftfy package, which is not "
                                 "installed: pip install ftfy")


def test_char_level_preprocess_writes_utf8_bytes(files, tmp_path):
    assert _cli("--input", files["a"], "--output-prefix", tmp_path / "c", "--tokenizer-type",
                "CharLevelTokenizer", "--append-eod") == 0
    dataset, docs = _read_documents(tmp_path / "c_text_document")
    assert docs == [list(d.encode("utf-8")) + [0] for d in files["docs"][:120] if d]
    assert dataset.index.dtype == numpy.uint16  # vocabulary 512


class _Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_on_a_terminal_and_lines_in_a_log(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(progress.time, "perf_counter", clock)
    terminal = _Terminal()
    bar = progress.Progress(terminal, interval=10, total=200)
    summary = preprocess.Summary(documents=50, tokens=5000)
    clock.now += 0.1
    bar.update(summary)
    assert terminal.getvalue() == ""  # nothing before 0.25 s: a short run shows no bar
    clock.now += 0.4  # 0.5 s in: 100 documents/s, 10,000 tokens/s
    bar.update(summary)
    shown = terminal.getvalue()
    assert shown.startswith("\rpreprocess: [" + "#" * 7 + "-" * 23 + "]  25% 50/200 documents, 5,000 tokens")
    assert "(100 docs/s, 10,000 tokens/s, 2 s left)" in shown
    bar.close()
    assert terminal.getvalue().endswith("\n")
    log = io.StringIO()
    lines = progress.Progress(log, interval=10)
    for documents in (5, 12, 19, 31):
        clock.now += 1.0
        lines.update(preprocess.Summary(documents=documents, tokens=documents * 10))
    assert [line.split(" (")[0] for line in log.getvalue().splitlines()] == [
        "preprocess: 12 documents, 120 tokens", "preprocess: 31 documents, 310 tokens"]
    assert "docs/s" in log.getvalue() and "tokens/s" in log.getvalue()


# --- the built-in corpus -----------------------------------------------------------------------


def test_builtin_corpus_is_deterministic_and_idempotent(tmp_path, monkeypatch):
    kwargs = dict(max_bytes=150_000, vocab_size=300, log=None)
    first = corpus.prepare_builtin_corpus(tmp_path / "a", **kwargs)
    corpus.prepare_builtin_corpus(tmp_path / "b", workers=2, **kwargs)
    for name in ("stdlib.jsonl", "tokenizer.json", "stdlib_text_document.bin",
                 "stdlib_text_document.idx"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    tok = build_tokenizer("HFTokenizer", first.tokenizer)
    assert (tok.vocab_size, tok.eod_id, tok.pad_id) == (300, 0, 1)
    docs = [json.loads(line) for line in Path(first.jsonl).read_text().splitlines()]
    assert sum(len(d["text"].encode()) for d in docs) <= 150_000
    assert not any("/test" in d["path"] or "site-packages" in d["path"] for d in docs)
    stored = _read_documents(first.data_prefix)[1]
    assert [tok.decode(ids) for ids in stored[:3]] == [d["text"] + EOD for d in docs[:3]]

    def must_not_rebuild(*args):
        raise AssertionError("rebuilt a complete corpus")

    monkeypatch.setattr(corpus, "_build", must_not_rebuild)
    assert corpus.prepare_builtin_corpus(tmp_path / "a", **kwargs) == first
    with pytest.raises(AssertionError, match="rebuilt"):  # another recipe is not reused
        corpus.prepare_builtin_corpus(tmp_path / "a", max_bytes=100_000, vocab_size=300, log=None)


def test_corpus_interrupted_before_its_manifest_is_not_complete(tmp_path, monkeypatch, capsys):
    paths = corpus.prepare_builtin_corpus(tmp_path, max_bytes=40_000, vocab_size=280, log=None)
    os.remove(paths.manifest)  # as if killed before the last rename
    built, original = [], corpus._build
    monkeypatch.setattr(corpus, "_build", lambda *a, **k: built.append(1) or original(*a, **k))
    parser = argparse.ArgumentParser()
    corpus.add_arguments(parser)
    args = parser.parse_args(["--output-dir", str(tmp_path), "--max-bytes", "40000",
                              "--vocab-size", "280"])
    assert corpus.run(args) == 0
    assert built == [1] and os.path.isfile(paths.manifest)
    out = capsys.readouterr().out
    assert f"data_path: {paths.data_prefix}" in out and f"vocab_file: {paths.tokenizer}" in out
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]


# --- the GCIDE corpus (a dictd file made here: no network) ------------------------------------

GCIDE_HEADER = """
00-database-url
   ftp://ftp.gnu.org/gnu/gcide

00-database-info
   This file was converted from the original database.

The original data was distributed with the notice shown below.
GCIDE is free software; you can redistribute it.
      A dictionary requires too many hands.     --Locke.
"""
GCIDE_ENTRIES = [
    # the first entry follows the header's indented line directly, as in the real file
    '0 \\0\\ adj.\n   1. indicating the absence of any units.\n\n   Syn: zero\n        [WordNet 1.5 +PJC]\n',
    # a headword line that wraps to column 0 continues the entry
    'Aaronic \\Aa*ron"ic\\, Aaronical\n\\Aa*ron"ic*al\\, a.\n   Pertaining to Aaron.\n   [1913 Webster]\n',
    'Abacus \\Ab"a*cus\\, n.; pl. E. {Abacuses}.\n   1. A table or tray strewn with sand.\n\n'
    '   2. A calculating table.\n      [1913 Webster]\n',
    "Caf\u00e9 \\Caf\u00e9\\, n.\n   The stock market\u2019s drop was far.\n   [PJC]\n",  # the cp1252 byte
]


def _gcide_file(path, entries=GCIDE_ENTRIES, compress=True):
    text = GCIDE_HEADER.lstrip("\n") + "\n".join(entries)
    data = text.replace("\u2019", "\x00").encode("utf-8").replace(b"\x00", b"\x92")  # one stray cp1252 byte
    Path(path).write_bytes(gzip.compress(data, mtime=0) if compress else data)
    return str(path)


def test_gcide_parser_one_document_per_entry(tmp_path):
    data = sources.read_dictd(_gcide_file(tmp_path / "g.dict.dz"))
    assert b"\x92" in data  # not UTF-8 as a whole: read line by line
    entries = list(sources.gcide_entries(sources.decode_dictd(data)))
    assert [e["text"] for e in entries] == GCIDE_ENTRIES  # header skipped, wrapped headword kept
    assert [e["headword"] for e in entries] == ["0", "Aaronic", "Abacus", "Caf\u00e9"]
    plain = sources.read_dictd(_gcide_file(tmp_path / "g.dict", compress=False))
    assert plain == data


def test_gcide_corpus_from_source_file(tmp_path, capsys, monkeypatch):
    entries = GCIDE_ENTRIES * 40  # enough text for a 300-id tokenizer
    source = _gcide_file(tmp_path / "gcide.dict.dz", entries)
    parser = argparse.ArgumentParser()
    corpus.add_arguments(parser)
    args = ["--source", "gcide", "--source-file", source, "--output-dir", str(tmp_path / "out"),
            "--vocab-size", "300"]
    assert corpus.run(parser.parse_args(args)) == 0
    paths = corpus.corpus_paths(tmp_path / "out", "gcide")
    assert f"data_path: {paths.data_prefix}" in capsys.readouterr().out
    docs = [json.loads(line) for line in Path(paths.jsonl).read_text().splitlines()]
    assert [d["text"] for d in docs] == entries
    manifest = corpus.read_manifest(tmp_path / "out")
    assert manifest["corpus"] == "gcide" and manifest["recipe"]["vocab_size"] == 300
    assert manifest["source"]["sha256"] == hashlib.sha256(sources.read_dictd(source)).hexdigest()
    tok = build_tokenizer("HFTokenizer", paths.tokenizer)
    stored = _read_documents(paths.data_prefix)[1]
    assert len(stored) == len(entries) and tok.decode(stored[3]) == entries[3] + EOD
    # a cap takes whole entries in file order; a rerun of the same recipe does nothing
    capped = corpus.prepare_corpus(tmp_path / "capped", "gcide", max_bytes=300, vocab_size=280,
                                   source_file=source, log=None)
    assert [json.loads(line)["text"] for line in Path(capped.jsonl).read_text().splitlines()] == entries[:2]
    monkeypatch.setattr(corpus, "_build", lambda *a: pytest.fail("rebuilt a complete corpus"))
    assert corpus.run(parser.parse_args(args)) == 0


@pytest.mark.parametrize("case", ["no_apt", "download_fails", "not_dictd", "not_gzip"])
def test_gcide_bad_source_is_one_line_naming_the_fix(tmp_path, capsys, monkeypatch, case):
    args = ["--source", "gcide", "--output-dir", str(tmp_path / "out")]
    if case == "no_apt":
        monkeypatch.setattr(sources.shutil, "which", lambda tool: None if tool == "apt-get" else "/bin/" + tool)
    elif case == "download_fails":
        monkeypatch.setattr(sources.shutil, "which", lambda tool: "/usr/bin/" + tool)
        monkeypatch.setattr(sources.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(
            a[0], 100, "", "E: Unable to locate package dict-gcide\n"))
    elif case == "not_dictd":
        (tmp_path / "x.txt").write_text("just some text\nwithout entries\n")
        args += ["--source-file", str(tmp_path / "x.txt")]
    else:
        (tmp_path / "x.dz").write_bytes(b"\x1f\x8b" + b"not gzip at all" * 4)
        args += ["--source-file", str(tmp_path / "x.dz")]
    parser = argparse.ArgumentParser()
    corpus.add_arguments(parser)
    assert corpus.run(parser.parse_args(args)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    expected = {"no_apt": "apt-get not found", "download_fails": "Unable to locate package dict-gcide",
                "not_dictd": "no dictionary entries", "not_gzip": "not a valid gzip"}[case]
    assert expected in err and ("--source-file" in err), err
    assert not (tmp_path / "out" / "corpus.json").exists()
    assert not [p for p in os.listdir(tmp_path / "out") if p.startswith(".tmp")]


# --- datasets ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok(files):
    return build_tokenizer("HFTokenizer", files["tokenizer"])


def test_data_path_split_gives_shifted_samples(dataset_prefix, tok, tmp_path):
    cfg = DataConfig(data_path=dataset_prefix, split="80, 15, 5")
    train, valid, test = build_datasets(cfg, seq_length=32, seed=1, num_samples=(40, 8, 4),
                                        tokenizer=tok, cache_dir=str(tmp_path))
    assert len(train) >= 40 and len(valid) >= 8 and len(test) >= 4
    sample = train[0]
    assert sample["tokens"].shape == sample["labels"].shape == (32,)
    assert torch.equal(sample["tokens"][1:], sample["labels"][:-1])
    assert torch.equal(sample["loss_mask"], torch.ones(32))
    again = build_datasets(cfg, seq_length=32, seed=1, num_samples=(40, 8, 4), tokenizer=tok)[0]
    other = build_datasets(cfg, seq_length=32, seed=2, num_samples=(40, 8, 4), tokenizer=tok)[0]
    assert all(torch.equal(again[i]["tokens"], train[i]["tokens"]) for i in range(40))
    assert not all(torch.equal(other[i]["tokens"], train[i]["tokens"]) for i in range(40))
    none_asked = build_datasets(cfg, seq_length=32, seed=1, num_samples=(40, 0, 0), tokenizer=tok)
    assert none_asked[1] is None and none_asked[2] is None


def test_per_split_paths_are_blended_by_weight(files, dataset_prefix, tok, tmp_path):
    other = tmp_path / "b"
    spec = preprocess.TokenizerSpec("HFTokenizer", files["tokenizer"])
    preprocess.preprocess([files["b"]], str(other), spec, append_eod=True, log=None)
    other = str(other) + "_text_document"
    cfg = DataConfig(train_data_paths=[dataset_prefix, other], train_data_weights=[1, 3],
                     valid_data_paths=[other], test_data_paths=[dataset_prefix])
    train, valid, test = build_datasets(cfg, seq_length=16, seed=3, num_samples=(400, 10, 10),
                                        tokenizer=tok, cache_dir=str(tmp_path / "cache"))
    assert len(train) == 400 and train[0]["tokens"].shape == (16,)
    assert torch.bincount(torch.as_tensor(train.dataset_index[:400])).tolist() == [100, 300]
    assert valid[0]["labels"].shape == test[0]["labels"].shape == (16,)
    assert any(p.name.endswith("BlendedDataset-train-dataset_index.npy")
               for p in (tmp_path / "cache").iterdir())
    cached = build_datasets(cfg, seq_length=16, seed=3, num_samples=(400, 10, 10), tokenizer=tok,
                            cache_dir=str(tmp_path / "cache"))[0]
    assert all(torch.equal(cached[i]["tokens"], train[i]["tokens"]) for i in range(0, 400, 7))


def test_sample_i_does_not_depend_on_how_many_samples_are_asked_for(files, dataset_prefix, tok, tmp_path):
    """megatron-core shuffles all the epochs of one request together: asking for more samples (a
    longer train_iters) used to change the first ones as soon as the request spanned two epochs."""
    one = DataConfig(data_path=dataset_prefix, split="1")
    per_epoch = len(build_datasets(one, seq_length=16, seed=4, num_samples=(1, 0, 0), tokenizer=tok)[0])
    short, long = (build_datasets(one, seq_length=16, seed=4, num_samples=(n, 0, 0), tokenizer=tok)[0]
                   for n in (per_epoch + per_epoch // 2, 3 * per_epoch))
    assert len(short) >= per_epoch + per_epoch // 2 and len(long) >= 3 * per_epoch
    assert all(torch.equal(short[i]["tokens"], long[i]["tokens"]) for i in range(len(short)))
    # each epoch is the documents in an order of its own
    assert [long[j]["tokens"].tolist() for j in range(8)] != [long[per_epoch + j]["tokens"].tolist() for j in range(8)]
    other = tmp_path / "b"  # and a blend over several epochs of its parts:
    preprocess.preprocess([files["b"]], str(other), preprocess.TokenizerSpec("HFTokenizer", files["tokenizer"]),
                          append_eod=True, log=None)
    blend = DataConfig(train_data_paths=[dataset_prefix, str(other) + "_text_document"], train_data_weights=[1, 3],
                       valid_data_paths=[dataset_prefix], test_data_paths=[dataset_prefix])
    short, long = (build_datasets(blend, seq_length=16, seed=4, num_samples=(n, 0, 0), tokenizer=tok)[0]
                   for n in (2 * per_epoch, 6 * per_epoch))
    assert all(torch.equal(short[i]["tokens"], long[i]["tokens"]) for i in range(len(short)))


LAYOUTS = [(1, 8, 1), (2, 4, 1), (2, 2, 2), (4, 1, 2), (1, 1, 8), (2, 1, 4)]
"""(dp_size, micro_batch_size, grad_accum): global batch 8 each."""


def test_each_step_consumes_the_same_samples_at_any_layout(dataset_prefix, tok):
    cfg = DataConfig(data_path=dataset_prefix, split="1")
    train = build_datasets(cfg, seq_length=16, seed=5, num_samples=(24, 0, 0), tokenizer=tok)[0]
    for step in range(3):
        expected = sorted(train[i]["tokens"].tolist() for i in range(step * 8, step * 8 + 8))
        for dp, micro, accum in LAYOUTS:
            rows, indices = [], []
            for m in range(accum):
                for r in range(dp):
                    batch = batch_for(train, step, m, r, dp, micro, accum,
                                      vocab_size=tok.vocab_size)
                    assert batch["tokens"].shape == batch["loss_mask"].shape == (micro, 16)
                    rows += batch["tokens"].tolist()
                    indices += list(sample_indices(step, m, r, dp, micro, accum))
            assert sorted(indices) == list(range(step * 8, step * 8 + 8))
            assert sorted(rows) == expected, (dp, micro, accum)
    with pytest.raises(IndexError, match="num_samples"):
        batch_for(train, 10**6, 0, 0, 1, 8, 1)


# --- bad data ----------------------------------------------------------------------------------


def test_data_made_with_another_tokenizer_is_refused(dataset_prefix, tok, tmp_path):
    small = ByteLevelBPETokenizer()
    small.train_from_iterator(SOURCES[:1], vocab_size=300, special_tokens=[EOD],
                              show_progress=False)
    small.save(str(tmp_path / "small.json"))
    small_tok = build_tokenizer("HFTokenizer", str(tmp_path / "small.json"))
    with pytest.raises(DataError, match=r"data_path: .*mix_text_document\.bin holds token id 3\d\d "
                                        r"\(full scan\).* 300 ids: .*another tokenizer"):
        build_datasets(DataConfig(data_path=dataset_prefix), seq_length=16, seed=1,
                       num_samples=(8, 1, 1), tokenizer=small_tok)
    train = build_datasets(DataConfig(data_path=dataset_prefix, split="90,5,5"), seq_length=16,
                           seed=1, num_samples=(8, 1, 1), tokenizer=tok)[0]
    with pytest.raises(DataError, match="another tokenizer"):  # the per-batch guard
        for step in range(len(train)):
            batch_for(train, step, 0, 0, 1, 1, 1, vocab_size=300)


def test_missing_bad_and_mismatched_data_are_clear_errors(dataset_prefix, tok, tmp_path):
    def build(**keys):
        return build_datasets(DataConfig(**keys), seq_length=16, seed=1, num_samples=(8, 1, 1),
                              tokenizer=tok)

    base = dataset_prefix[: -len("_text_document")]
    with pytest.raises(DataError, match=r"no dataset at prefix .*neox-sophia preprocess.*did you "
                                        r"mean .*mix_text_document"):
        build(data_path=base)
    with pytest.raises(DataError, match="without the extension"):
        build(data_path=dataset_prefix + ".bin")
    paths = dict(train_data_paths=[dataset_prefix] * 2, valid_data_paths=[dataset_prefix],
                 test_data_paths=[dataset_prefix])
    with pytest.raises(DataError, match="train_data_weights: 1 weights for 2 train_data_paths"):
        build(**paths, train_data_weights=[1.0])
    with pytest.raises(DataError, match="positive"):
        build(**paths, train_data_weights=[1.0, 0.0])
    cut = tmp_path / "cut"
    (tmp_path / "cut.idx").write_bytes(Path(dataset_prefix + ".idx").read_bytes())
    (tmp_path / "cut.bin").write_bytes(Path(dataset_prefix + ".bin").read_bytes()[:-10])
    with pytest.raises(DataError, match=r"cut\.bin has .* bytes but its \.idx describes"):
        build(data_path=str(cut))
    with pytest.raises(DataError, match="leaves the test split .* no documents"):
        build(data_path=dataset_prefix, split="100, 1, 0.0001")
    assert read_index(dataset_prefix).documents == 198
