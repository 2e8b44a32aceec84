"""Tokenizers, picked by GPT-NeoX's `tokenizer_type` (matched case-insensitively, as NeoX does).

    HFTokenizer         vocab_file = a Hugging Face tokenizer.json (e.g. the 20B tokenizer of the Pile)
    GPT2BPETokenizer    vocab_file = GPT-2 vocab.json, merge_file = merges.txt (NeoX's default type)
    SPMTokenizer        vocab_file = a sentencepiece .model file
    HFGPT2Tokenizer     vocab_file = a directory with GPT-2's vocab.json + merges.txt, or a Hugging Face
                        Hub name (downloaded by transformers); unset: "gpt2", as NeoX (needs transformers)
    TiktokenTokenizer   vocab_file = a tiktoken encoding name, e.g. cl100k_base (needs tiktoken, which
                        downloads the encoding once and caches it)
    CharLevelTokenizer  no file: UTF-8 bytes, vocabulary 512 (NeoX's)

The vocabulary size comes from the file (CharLevelTokenizer: NeoX's fixed 512). `eod_id` is the
end-of-document id that `preprocess --append-eod` writes between documents. A type whose package
is not installed says so in one line (MissingDependency).
"""
from __future__ import annotations

import difflib
import os
import warnings
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Type

import sentencepiece
import tokenizers
from tokenizers import decoders, models, pre_tokenizers

EOD_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|padding|>"


class Tokenizer:
    """What the rest of neox-sophia needs from a tokenizer.

    Subclasses set `name` (the NeoX `tokenizer_type`), `file_keys` (the config keys of the files
    they read, in constructor order) and fill `_vocab_size`, `_eod_id`, `pad_id` and `_source`.
    """

    name: str = "Tokenizer"
    file_keys: Tuple[str, ...] = ("vocab_file",)
    local_files: bool = True
    """Whether file_keys name files on this machine (not a Hub or encoding name)."""

    _vocab_size: int
    _eod_id: Optional[int]
    pad_id: Optional[int]
    """Id of the padding token, or None when the vocabulary has none."""
    _source: str  # the file(s) it was read from, for messages

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce (before NeoX's padding to a multiple)."""
        return self._vocab_size

    @property
    def eod_id(self) -> int:
        """End-of-document id. Raises (naming the file) when the vocabulary has none: asked for
        lazily so that a tokenizer without one still encodes text."""
        if self._eod_id is None:
            raise ValueError(
                f"{self.name} from {self._source} has no end-of-document token "
                f"({self._eod_description()}); --append-eod needs one"
            )
        return self._eod_id

    def _eod_description(self) -> str:
        return f"no {EOD_TOKEN!r} token"

    def encode(self, text: str) -> List[int]:
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def encode_batch(self, texts: Iterable[str]) -> List[List[int]]:
        """Encode several texts; subclasses override this with a faster native batch path."""
        return [self.encode(text) for text in texts]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._source}, vocab_size={self.vocab_size})"


def _check_file(owner: str, key: str, path: Optional[str | os.PathLike]) -> str:
    """The path as a str, or an error naming the config key and the path."""
    if path is None or path == "":
        raise ValueError(f"{owner} needs {key}, which was not given")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{key}: no such file: {path!r} (for {owner})")
    if not os.access(path, os.R_OK):
        raise PermissionError(f"{key}: cannot read {path!r} (for {owner})")
    return path


def _load_error(key: str, path: str, what: str, err: Exception) -> ValueError:
    return ValueError(f"{key}: could not load {path!r} as {what}: {err}")


class MissingDependency(ImportError):
    """A tokenizer type whose optional package is not installed; the message is the pip command."""


def _import_optional(module: str, owner: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingDependency(f"{owner} needs the {module} package, which is not installed: "
                                f"pip install {module}") from None


class _TokenizersBacked(Tokenizer):
    """Shared code for the two tokenizers that run on the Rust `tokenizers` library."""

    _backend: tokenizers.Tokenizer

    def _init_ids(self) -> None:
        self._vocab_size = self._backend.get_vocab_size(with_added_tokens=True)
        self._eod_id = self._backend.token_to_id(EOD_TOKEN)
        self.pad_id = self._backend.token_to_id(PAD_TOKEN)

    def encode(self, text: str) -> List[int]:
        return self._backend.encode(text).ids

    def encode_batch(self, texts: Iterable[str]) -> List[List[int]]:
        return [encoding.ids for encoding in self._backend.encode_batch(list(texts))]

    def decode(self, ids: Sequence[int]) -> str:
        # Keep special tokens (the `tokenizers` default drops them) so document boundaries show
        # and decode(encode(text)) == text holds for text that contains them.
        return self._backend.decode(list(ids), skip_special_tokens=False)


class HFTokenizer(_TokenizersBacked):
    """A Hugging Face `tokenizers` tokenizer.json, loaded as NeoX does: eod is "<|endoftext|>",
    pad is "<|padding|>" when present, vocab_size counts added tokens (50277 for the 20B one)."""

    name = "HFTokenizer"
    file_keys = ("vocab_file",)

    def __init__(self, vocab_file: str | os.PathLike):
        path = _check_file(self.name, "vocab_file", vocab_file)
        try:
            self._backend = tokenizers.Tokenizer.from_file(path)
        except Exception as err:  # the Rust side raises plain Exception
            raise _load_error("vocab_file", path, "a Hugging Face tokenizer.json", err) from err
        self._source = f"vocab_file={path!r}"
        self._init_ids()


class GPT2BPETokenizer(_TokenizersBacked):
    """GPT-2's byte-level BPE from vocab.json + merges.txt (NeoX's default tokenizer_type).

    Built as GPT-2 is: byte-level pre-tokenizer with GPT-2's split regex and no prefix space,
    BPE with the merges in file order, byte-level decoder (invalid UTF-8 decodes to U+FFFD, as
    GPT-2's errors="replace"). "<|endoftext|>" is matched as one special token in text, as
    NeoX's (transformers') GPT2Tokenizer does; vocab_size is the number of entries in vocab.json.
    """

    name = "GPT2BPETokenizer"
    file_keys = ("vocab_file", "merge_file")

    def __init__(self, vocab_file: str | os.PathLike, merge_file: str | os.PathLike | None):
        vocab_path = _check_file(self.name, "vocab_file", vocab_file)
        merge_path = _check_file(self.name, "merge_file", merge_file)
        try:
            bpe = models.BPE.from_file(vocab_path, merge_path)
        except Exception as err:
            what = f"a GPT-2 vocab.json with merge_file {merge_path!r}"
            raise _load_error("vocab_file", vocab_path, what, err) from err
        backend = tokenizers.Tokenizer(bpe)
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        backend.decoder = decoders.ByteLevel()
        if backend.token_to_id(EOD_TOKEN) is not None:
            # Already in the vocabulary, so this adds no id; it only stops BPE from splitting it.
            backend.add_special_tokens([EOD_TOKEN])
        self._backend = backend
        self._source = f"vocab_file={vocab_path!r}, merge_file={merge_path!r}"
        self._init_ids()


class SPMTokenizer(Tokenizer):
    """A sentencepiece model. eod is the "<|endoftext|>" piece when the model has one, else the
    model's eos id (NeoX takes piece_to_id("<|endoftext|>"), which silently gives the unk id when
    the piece is absent). Note that sentencepiece normalizes text (by default NFKC and collapsing
    runs of whitespace), so decode(encode(text)) is the normalized text, not always `text`."""

    name = "SPMTokenizer"
    file_keys = ("vocab_file",)

    def __init__(self, vocab_file: str | os.PathLike):
        path = _check_file(self.name, "vocab_file", vocab_file)
        try:
            self._processor = sentencepiece.SentencePieceProcessor(model_file=path)
        except Exception as err:
            raise _load_error("vocab_file", path, "a sentencepiece model", err) from err
        processor = self._processor
        self._source = f"vocab_file={path!r}"
        self._vocab_size = processor.vocab_size()
        eod_piece = processor.piece_to_id(EOD_TOKEN)  # the unk id when absent
        if processor.id_to_piece(eod_piece) == EOD_TOKEN:
            self._eod_id = eod_piece
        else:
            self._eod_id = processor.eos_id() if processor.eos_id() >= 0 else None
        self.pad_id = processor.pad_id() if processor.pad_id() >= 0 else None

    def _eod_description(self) -> str:
        return f"no {EOD_TOKEN!r} piece and eos is disabled"

    def encode(self, text: str) -> List[int]:
        return self._processor.encode(text)

    def encode_batch(self, texts: Iterable[str]) -> List[List[int]]:
        return self._processor.encode(list(texts))

    def decode(self, ids: Sequence[int]) -> str:
        return self._processor.decode(list(ids))


class HFGPT2Tokenizer(_TokenizersBacked):
    """transformers' GPT2TokenizerFast, loaded as NeoX does: from a directory with vocab.json and
    merges.txt (or tokenizer.json) or a Hub name ("gpt2" when vocab_file is unset, which needs the
    network); "<|padding|>" is added as the pad token, so vocab_size is len(tokenizer) (50258 for
    GPT-2's), and eod is the tokenizer's eos id. Text is encoded by its Rust backend, so a
    "<|endoftext|>" in the text is one token, as with GPT2BPETokenizer."""

    name = "HFGPT2Tokenizer"
    file_keys = ("vocab_file",)
    local_files = False

    def __init__(self, vocab_file: str | os.PathLike | None):
        transformers = _import_optional("transformers", self.name)
        source = os.fspath(vocab_file) if vocab_file else "gpt2"
        try:
            hf = transformers.GPT2TokenizerFast.from_pretrained(source)
        except Exception as err:  # OSError for a missing directory or an unreachable Hub
            what = "a GPT-2 tokenizer (a directory with vocab.json and merges.txt, or a Hub name)"
            raise _load_error("vocab_file", source, what, err) from err
        hf.add_special_tokens({"pad_token": PAD_TOKEN})
        self._backend = hf.backend_tokenizer
        self._source = f"vocab_file={source!r}"
        self._vocab_size = len(hf)
        self._eod_id, self.pad_id = hf.eos_token_id, hf.pad_token_id


class TiktokenTokenizer(Tokenizer):
    """An OpenAI tiktoken encoding named by vocab_file (tiktoken fetches it from the internet the
    first time and caches it; TIKTOKEN_CACHE_DIR points at a cache for offline machines). eod is
    the encoding's end-of-text token, vocab_size its n_vocab, no pad. Special-token text such as
    "<|endoftext|>" is encoded as the special token (NeoX's batch path does so; its one-document
    path raises instead)."""

    name = "TiktokenTokenizer"
    file_keys = ("vocab_file",)
    local_files = False

    def __init__(self, vocab_file: str | None):
        tiktoken = _import_optional("tiktoken", self.name)
        if not vocab_file:
            raise ValueError(f"{self.name} needs vocab_file (a tiktoken encoding name such as cl100k_base), "
                             f"which was not given")
        try:
            self._encoding = tiktoken.get_encoding(os.fspath(vocab_file))
        except Exception as err:  # an unknown name, or no network and no cache
            raise _load_error("vocab_file", vocab_file, "a tiktoken encoding name", err) from err
        self._source = f"vocab_file={vocab_file!r}"
        self._vocab_size = self._encoding.n_vocab
        self._eod_id, self.pad_id = self._encoding.eot_token, None

    def encode(self, text: str) -> List[int]:
        return self._encoding.encode(text, allowed_special="all")

    def encode_batch(self, texts: Iterable[str]) -> List[List[int]]:
        return self._encoding.encode_batch(list(texts), allowed_special="all")

    def decode(self, ids: Sequence[int]) -> str:
        return self._encoding.decode(list(ids))


class CharLevelTokenizer(Tokenizer):
    """NeoX's character-level tokenizer: the UTF-8 bytes of the text as ids, a vocabulary of 512,
    eod 0 and pad 1 (the same ids as the bytes NUL and SOH, as in NeoX). decode() turns the byte
    ids back into text (NeoX's maps each id to one character, which garbles non-ASCII text)."""

    name = "CharLevelTokenizer"
    file_keys = ()
    local_files = False
    VOCAB_SIZE = 512

    def __init__(self):
        self._vocab_size, self._eod_id, self.pad_id = self.VOCAB_SIZE, 0, 1
        self._source = "no file"

    def encode(self, text: str) -> List[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


TOKENIZERS: Dict[str, Type[Tokenizer]] = {cls.name.lower(): cls for cls in (
    HFTokenizer, GPT2BPETokenizer, SPMTokenizer, HFGPT2Tokenizer, TiktokenTokenizer, CharLevelTokenizer)}
"""NeoX `tokenizer_type`, lowercased -> implementation (every type NeoX has)."""


def tokenizer_class(tokenizer_type: str) -> Type[Tokenizer]:
    """The implementation of NeoX's `tokenizer_type` (any case); ValueError with the closest name."""
    known = ", ".join(cls.name for cls in TOKENIZERS.values())
    if not isinstance(tokenizer_type, str) or not tokenizer_type:
        raise ValueError(f"tokenizer_type must be one of: {known} (got {tokenizer_type!r})")
    key = tokenizer_type.lower()
    if key in TOKENIZERS:
        return TOKENIZERS[key]
    canonical = {cls.name.lower(): cls.name for cls in TOKENIZERS.values()}
    close = difflib.get_close_matches(key, list(canonical), n=1, cutoff=0.6)
    hint = f"; did you mean {canonical[close[0]]!r}?" if close else ""
    raise ValueError(f"unknown tokenizer_type {tokenizer_type!r}; known: {known}{hint}")


def build_tokenizer(
    tokenizer_type: str,
    vocab_file: str | os.PathLike | None,
    merge_file: str | os.PathLike | None = None,
) -> Tokenizer:
    """The tokenizer named by NeoX's `tokenizer_type`, read from `vocab_file` (+ `merge_file`).

    Raises ValueError for an unknown type (with the closest known name) or a required file that
    was not given, FileNotFoundError naming the key and path for a missing file, and
    MissingDependency when the type's optional package is not installed.
    """
    cls = tokenizer_class(tokenizer_type)
    files = {"vocab_file": vocab_file, "merge_file": merge_file}
    for key, path in files.items():
        if key not in cls.file_keys and path is not None:
            warnings.warn(f"{key} is not used by {cls.name}; ignoring {os.fspath(path)!r}", stacklevel=2)
    return cls(*(files[key] for key in cls.file_keys))


TOKENIZER_ERRORS = (ValueError, OSError, MissingDependency)
"""What build_tokenizer raises for a bad tokenizer setting; each message is one line."""


def build_tokenizer_or_refuse(data) -> Tokenizer:
    """build_tokenizer for a DataConfig; a bad setting becomes a one-line ConfigError."""
    from neox_sophia.config.base import ConfigError

    try:
        return build_tokenizer(data.tokenizer_type, data.vocab_file, data.merge_file)
    except TOKENIZER_ERRORS as err:
        message = str(err)
        key = next((k for k in ("merge_file", "vocab_file") if k in message), "tokenizer_type")
        raise ConfigError(message if message.startswith(key) else f"{key}: {message}", key) from None
