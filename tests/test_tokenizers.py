"""Tokenizers (neox_sophia/data/tokenizers.py) on tiny tokenizer files trained here, offline,
from the source of a few Python standard-library modules."""
import argparse
import difflib
import inspect
import io
import json
import json.encoder
import string
import textwrap
from pathlib import Path

import pytest
import regex  # GPT-2's split pattern needs \p{L}; installed with transformers (test extra)
import sentencepiece
import tokenizers
from tokenizers import ByteLevelBPETokenizer

from neox_sophia.data import Tokenizer, build_tokenizer
from neox_sophia.data.tokenizers import (
    TOKENIZERS,
    CharLevelTokenizer,
    GPT2BPETokenizer,
    HFGPT2Tokenizer,
    HFTokenizer,
    MissingDependency,
    SPMTokenizer,
    TiktokenTokenizer,
    build_tokenizer_or_refuse,
)

EOD = "<|endoftext|>"
TRAIN_TEXTS = [inspect.getsource(module) for module in (textwrap, difflib, argparse, string)]
# Held out from training; non-ASCII, tabs, runs of spaces and newlines on purpose.
HELD_OUT = inspect.getsource(json.encoder)[:6000] + "\n\tnaïve café — ✓ 🙂  x\u3000y\n\n"


@pytest.fixture(scope="module")
def bpe_files(tmp_path_factory):
    """A byte-level BPE (vocab 500, "<|endoftext|>" special) saved both ways."""
    directory = tmp_path_factory.mktemp("bpe")
    trained = ByteLevelBPETokenizer()
    trained.train_from_iterator(
        TRAIN_TEXTS, vocab_size=500, min_frequency=2, special_tokens=[EOD], show_progress=False
    )
    trained.save(str(directory / "tokenizer.json"))
    trained.save_model(str(directory))  # vocab.json + merges.txt, GPT-2's format
    return {
        "tokenizer.json": str(directory / "tokenizer.json"),
        "vocab.json": str(directory / "vocab.json"),
        "merges.txt": str(directory / "merges.txt"),
    }


def _read_json(path):
    return json.loads(Path(path).read_text("utf-8"))


def _train_spm(path, **options):
    lines = [line for text in TRAIN_TEXTS for line in text.splitlines() if line.strip()]
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, minloglevel=2, **options
    )
    path.write_bytes(model.getvalue())
    return str(path)


@pytest.fixture(scope="module")
def spm_default(tmp_path_factory):
    """sentencepiece's defaults: nmt_nfkc normalization, whitespace collapsed, no byte fallback."""
    path = tmp_path_factory.mktemp("spm") / "default.model"
    return _train_spm(path, vocab_size=200, model_type="bpe")


@pytest.fixture(scope="module")
def spm_exact(tmp_path_factory):
    """No normalization, byte fallback and a "<|endoftext|>" piece: a lossless model."""
    path = tmp_path_factory.mktemp("spm") / "exact.model"
    return _train_spm(
        path,
        vocab_size=600,  # 256 byte pieces + the characters + merges
        model_type="unigram",
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        byte_fallback=True,
        user_defined_symbols=[EOD],
    )


# --- HFTokenizer -------------------------------------------------------------------------------


def test_hf_tokenizer_vocab_eod_and_round_trip(bpe_files):
    tok = build_tokenizer("HFTokenizer", bpe_files["tokenizer.json"])
    assert isinstance(tok, HFTokenizer) and isinstance(tok, Tokenizer)
    assert tok.name == "HFTokenizer"
    saved = _read_json(bpe_files["tokenizer.json"])
    assert tok.vocab_size == len(saved["model"]["vocab"]) == 500
    (eod_entry,) = [t for t in saved["added_tokens"] if t["content"] == EOD]
    assert tok.eod_id == eod_entry["id"]
    assert tok.pad_id is None  # no "<|padding|>" in this vocabulary

    text = HELD_OUT + EOD + "next document"
    ids = tok.encode(text)
    assert ids.count(tok.eod_id) == 1  # the special token is one id, not split
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text  # special tokens are kept by decode
    assert tok.encode_batch([text, "", "x"]) == [ids, [], tok.encode("x")]


def test_hf_tokenizer_pad_and_added_tokens_count(bpe_files, tmp_path):
    backend = tokenizers.Tokenizer.from_file(bpe_files["tokenizer.json"])
    backend.add_special_tokens(["<|padding|>"])
    backend.save(str(tmp_path / "padded.json"))
    tok = build_tokenizer("HFTokenizer", str(tmp_path / "padded.json"))
    assert tok.pad_id == 500 and tok.vocab_size == 501  # with added tokens, as NeoX


def test_hf_tokenizer_without_eod_token_fails_only_when_asked(tmp_path):
    trained = ByteLevelBPETokenizer()
    trained.train_from_iterator(TRAIN_TEXTS[:1], vocab_size=300, show_progress=False)
    trained.save(str(tmp_path / "no_eod.json"))
    tok = build_tokenizer("HFTokenizer", str(tmp_path / "no_eod.json"))
    assert tok.decode(tok.encode("abc")) == "abc"
    with pytest.raises(ValueError, match=r"no_eod\.json.*<\|endoftext\|>"):
        tok.eod_id  # noqa: B018 (the property raises)


# --- GPT2BPETokenizer --------------------------------------------------------------------------


def test_gpt2_bpe_vocab_eod_and_round_trip(bpe_files):
    tok = build_tokenizer("GPT2BPETokenizer", bpe_files["vocab.json"], bpe_files["merges.txt"])
    assert isinstance(tok, GPT2BPETokenizer) and tok.name == "GPT2BPETokenizer"
    vocab = _read_json(bpe_files["vocab.json"])
    assert tok.vocab_size == len(vocab) == 500
    assert tok.eod_id == vocab[EOD]
    text = HELD_OUT + EOD + "next"
    ids = tok.encode(text)
    assert ids.count(tok.eod_id) == 1
    assert tok.decode(ids) == text
    assert tok.decode(tok.encode("a\xff") + [tok.encode("é")[0]]) == "a\xff\ufffd"  # bad UTF-8


def test_hf_and_gpt2_bpe_give_identical_ids(bpe_files):
    hf = build_tokenizer("HFTokenizer", bpe_files["tokenizer.json"])
    gpt2 = build_tokenizer("GPT2BPETokenizer", bpe_files["vocab.json"], bpe_files["merges.txt"])
    texts = [HELD_OUT, EOD.join(TRAIN_TEXTS[3].split("\n\n")[:20]), "  leading spaces", ""]
    assert gpt2.encode_batch(texts) == hf.encode_batch(texts)
    assert gpt2.encode(texts[1]) == hf.encode(texts[1])


def _reference_gpt2_encode(vocab_file, merge_file, text):
    """OpenAI's gpt-2 src/encoder.py (the original GPT-2 BPE), condensed."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    byte_to_char = {b: chr(b) for b in printable}
    byte_to_char.update({b: chr(256 + n) for n, b in enumerate(others)})
    encoder = _read_json(vocab_file)
    merges = [tuple(line.split()) for line in Path(merge_file).read_text("utf-8").splitlines()
              if line and not line.startswith("#version")]
    ranks = {pair: rank for rank, pair in enumerate(merges)}
    pattern = regex.compile(
        r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
    )
    ids = []
    for piece in pattern.findall(text):
        word = [byte_to_char[b] for b in piece.encode("utf-8")]
        while len(word) > 1:
            pairs = set(zip(word, word[1:]))
            best = min(pairs, key=lambda pair: ranks.get(pair, float("inf")))
            if best not in ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        ids.extend(encoder[token] for token in word)
    return ids


def test_gpt2_bpe_matches_the_original_gpt2_encoder(bpe_files):
    tok = build_tokenizer("gpt2bpetokenizer", bpe_files["vocab.json"], bpe_files["merges.txt"])
    expected = _reference_gpt2_encode(bpe_files["vocab.json"], bpe_files["merges.txt"], HELD_OUT)
    assert tok.encode(HELD_OUT) == expected


# --- SPMTokenizer ------------------------------------------------------------------------------


def test_spm_default_model_normalizes_whitespace_and_nfkc(spm_default):
    tok = build_tokenizer("SPMTokenizer", spm_default)
    processor = sentencepiece.SentencePieceProcessor(model_file=spm_default)
    assert isinstance(tok, SPMTokenizer) and tok.name == "SPMTokenizer"
    assert tok.vocab_size == processor.get_piece_size() == 200
    assert tok.eod_id == processor.eos_id() == 2  # no "<|endoftext|>" piece: eos
    assert tok.pad_id is None  # pad disabled by default
    # sentencepiece's default normalization is lossy: runs of whitespace (newlines and tabs
    # included) become one space, leading/trailing whitespace goes, NFKC folds "ﬁ" and "Ａ".
    text = "  def   f(x):\n\treturn x + 1  # ﬁle Ａ \n"
    assert tok.decode(tok.encode(text)) == "def f(x): return x + 1 # file A"
    assert tok.decode(tok.encode(text)) != text
    assert tok.encode_batch([text, "abc"]) == [tok.encode(text), tok.encode("abc")]


def test_spm_lossless_model_round_trips_and_uses_eod_piece(spm_exact):
    tok = build_tokenizer("spmtokenizer", spm_exact)
    processor = sentencepiece.SentencePieceProcessor(model_file=spm_exact)
    assert tok.vocab_size == processor.vocab_size() == 600
    assert tok.eod_id == processor.piece_to_id(EOD) != processor.eos_id()
    text = HELD_OUT + EOD + "next"
    ids = tok.encode(text)
    assert ids.count(tok.eod_id) == 1
    assert tok.decode(ids) == text  # identity normalization + byte fallback: exact
    assert tok.encode_batch([text, ""]) == [ids, []]


# --- build_tokenizer: names and errors ---------------------------------------------------------


def test_registry_is_keyed_by_lowercased_type_name():
    assert {key: cls.name.lower() for key, cls in TOKENIZERS.items()} == {k: k for k in TOKENIZERS}


@pytest.mark.parametrize("name", ["hftokenizer", "HFTokenizer", "HFTOKENIZER", "HfTokenizer"])
def test_type_names_are_case_insensitive(name, bpe_files):
    assert isinstance(build_tokenizer(name, bpe_files["tokenizer.json"]), HFTokenizer)


def test_unknown_type_lists_known_and_suggests_closest():
    with pytest.raises(ValueError) as err:
        build_tokenizer("GPT2BPETokeniser", "vocab.json")
    message = str(err.value)
    assert "GPT2BPETokeniser" in message and "did you mean 'GPT2BPETokenizer'" in message
    assert all(cls.name in message for cls in TOKENIZERS.values())
    with pytest.raises(ValueError, match="tokenizer_type must be one of: HFTokenizer"):
        build_tokenizer(None, "vocab.json")


# the --tokenizer-type choices of NeoX's tools/datasets/preprocess_data.py (NeoXArgs has the same)
NEOX_TYPES = ["HFGPT2Tokenizer", "HFTokenizer", "GPT2BPETokenizer", "CharLevelTokenizer", "TiktokenTokenizer",
              "SPMTokenizer"]


def test_every_neox_tokenizer_type_is_implemented():
    assert sorted(cls.name for cls in TOKENIZERS.values()) == sorted(NEOX_TYPES)


def test_missing_files_name_the_key_and_path(bpe_files, tmp_path):
    missing = str(tmp_path / "nope.json")
    with pytest.raises(FileNotFoundError, match=r"vocab_file.*nope\.json"):
        build_tokenizer("HFTokenizer", missing)
    with pytest.raises(FileNotFoundError, match=r"merge_file.*nope\.json"):
        build_tokenizer("GPT2BPETokenizer", bpe_files["vocab.json"], missing)
    with pytest.raises(FileNotFoundError, match=r"vocab_file.*nope\.json"):
        build_tokenizer("SPMTokenizer", missing)


def test_required_file_not_given_names_the_key(bpe_files):
    with pytest.raises(ValueError, match="GPT2BPETokenizer needs merge_file"):
        build_tokenizer("GPT2BPETokenizer", bpe_files["vocab.json"])
    with pytest.raises(ValueError, match="HFTokenizer needs vocab_file"):
        build_tokenizer("HFTokenizer", None)


def test_unparsable_file_names_the_key_and_path(bpe_files):
    with pytest.raises(ValueError, match=r"vocab_file.*merges\.txt.*tokenizer\.json"):
        build_tokenizer("HFTokenizer", bpe_files["merges.txt"])
    with pytest.raises(ValueError, match=r"vocab_file.*tokenizer\.json.*sentencepiece"):
        build_tokenizer("SPMTokenizer", bpe_files["tokenizer.json"])


def test_unused_merge_file_is_reported(bpe_files):
    with pytest.warns(UserWarning, match="merge_file is not used by HFTokenizer"):
        build_tokenizer("HFTokenizer", bpe_files["tokenizer.json"], bpe_files["merges.txt"])


def test_a_bad_tokenizer_setting_is_one_config_error_line(bpe_files):
    from neox_sophia.config import ConfigError
    from neox_sophia.config.sections import DataConfig

    with pytest.raises(ConfigError) as err:  # NeoX: an AssertionError traceback
        build_tokenizer_or_refuse(DataConfig(vocab_file=bpe_files["vocab.json"]))
    assert "merge_file" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="^vocab_file: no such file"):
        build_tokenizer_or_refuse(DataConfig(tokenizer_type="HFTokenizer", vocab_file="/nonexistent.json"))


# --- HFGPT2Tokenizer, CharLevelTokenizer, TiktokenTokenizer -------------------------------------


def test_hf_gpt2_tokenizer_is_transformers_gpt2_with_neox_padding(bpe_files):
    """NeoX's definition, through transformers itself: GPT2TokenizerFast.from_pretrained, then
    "<|padding|>" added as the pad token; vocab_size = len(tokenizer), eod = eos id."""
    from transformers import GPT2TokenizerFast

    directory = str(Path(bpe_files["vocab.json"]).parent)
    reference = GPT2TokenizerFast.from_pretrained(directory)
    reference.add_special_tokens({"pad_token": "<|padding|>"})
    tok = build_tokenizer("HFGPT2Tokenizer", directory)
    assert isinstance(tok, HFGPT2Tokenizer)
    assert tok.vocab_size == len(reference) == 501 and tok.pad_id == reference.pad_token_id == 500
    assert tok.eod_id == reference.eos_token_id == _read_json(bpe_files["vocab.json"])[EOD]
    text = HELD_OUT + EOD + "next"
    assert tok.encode(text) == reference.encode(text)
    assert tok.encode_batch([text, ""]) == [reference.encode(text), []]
    assert tok.decode(tok.encode(text)) == text
    gpt2 = build_tokenizer("GPT2BPETokenizer", bpe_files["vocab.json"], bpe_files["merges.txt"])
    assert tok.encode(text) == gpt2.encode(text)  # the same BPE, one more (pad) id


def test_char_level_tokenizer_is_utf8_bytes_with_neox_ids():
    tok = build_tokenizer("CharLevelTokenizer", None)
    assert isinstance(tok, CharLevelTokenizer)
    assert (tok.vocab_size, tok.eod_id, tok.pad_id) == (512, 0, 1)  # NeoX: CharLevelTokenizer(vocab_size=512)
    assert tok.encode("héllo") == [104, 195, 169, 108, 108, 111]  # NeoX: np.fromstring(text, uint8)
    assert tok.encode_batch([HELD_OUT, ""]) == [list(HELD_OUT.encode("utf-8")), []]
    assert tok.decode(tok.encode(HELD_OUT)) == HELD_OUT
    with pytest.warns(UserWarning, match="vocab_file is not used by CharLevelTokenizer"):
        build_tokenizer("CharLevelTokenizer", "vocab.json")


def test_tiktoken_without_the_package_is_one_line(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "tiktoken", None)  # as if not installed
    with pytest.raises(MissingDependency, match="^TiktokenTokenizer needs the tiktoken package.*pip install tiktoken$"):
        build_tokenizer("TiktokenTokenizer", "cl100k_base")


def test_tiktoken_tokenizer_on_an_offline_encoding(monkeypatch):
    """tiktoken downloads its published encodings (cl100k_base...) on first use, which CI cannot:
    a byte-level encoding built here stands in for one, through tiktoken's own Encoding class."""
    tiktoken = pytest.importorskip("tiktoken")
    offline = tiktoken.Encoding(name="bytes", pat_str=r"\s+|\S+",
                                mergeable_ranks={bytes([b]): b for b in range(256)},
                                special_tokens={EOD: 256})
    asked = []
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: asked.append(name) or offline)
    tok = build_tokenizer("TiktokenTokenizer", "cl100k_base")
    assert isinstance(tok, TiktokenTokenizer) and asked == ["cl100k_base"]
    assert (tok.vocab_size, tok.eod_id, tok.pad_id) == (257, 256, None)
    text = "naïve" + EOD + "x"
    assert tok.encode(text) == [*"naïve".encode("utf-8"), 256, ord("x")]  # the special token is one id
    assert tok.encode_batch([text, ""]) == [tok.encode(text), []]
    assert tok.decode(tok.encode(text)) == text
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: (_ for _ in ()).throw(ValueError("unknown")))
    with pytest.raises(ValueError, match="vocab_file: could not load 'nope' as a tiktoken encoding name"):
        build_tokenizer("TiktokenTokenizer", "nope")
