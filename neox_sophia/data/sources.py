"""Where the built-in corpora's text comes from: a registry of sources for `neox-sophia corpus`.

    stdlib   Python's standard-library sources (every Python install ships them): code
    gcide    GCIDE, the GNU Collaborative International Dictionary of English (Webster's 1913
             plus WordNet; GPL), from the Debian package dict-gcide: English prose

A source turns (max_bytes, source_file) into documents (dicts with "text" and one id field) and
says what it came from (its provenance, for the manifest). The tokenizer, the dataset and the
manifest are made the same way for every source (neox_sophia.data.corpus).
"""
from __future__ import annotations

import glob
import gzip
import hashlib
import platform
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple

from neox_sophia.data.preprocess import InputError

Documents = Tuple[List[dict], dict]
"""(documents: {"text", <id field>}, provenance for the manifest)."""


@dataclass(frozen=True)
class CorpusSource:
    name: str
    description: str
    default_max_bytes: int
    documents: Callable[[int, Optional[str]], Documents]
    """(max_bytes, source_file or None) -> Documents; InputError (one line) on bad input."""
    recipe: Callable[[], dict]
    """What the corpus is a function of besides max_bytes and vocab_size (a manifest whose
    recipe differs is rebuilt, not reused)."""
    takes_source_file: bool = False


# --- stdlib ------------------------------------------------------------------------------------

SKIPPED_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


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


def _stdlib_documents(max_bytes: int, source_file: Optional[str]) -> Documents:
    root = sysconfig.get_paths()["stdlib"]
    files = stdlib_files(max_bytes, root)
    if not files:
        raise InputError(f"no standard-library sources found under {root} (max_bytes={max_bytes})")
    return [{"text": text, "path": rel} for rel, text in files], {"stdlib": root}


def _stdlib_recipe() -> dict:
    # the manifests written before sources were a registry hold exactly these keys: they stay valid
    return {"python": platform.python_version(), "implementation": sys.implementation.name}


# --- gcide -------------------------------------------------------------------------------------

GCIDE_PACKAGE = "dict-gcide"
GCIDE_FILE = "usr/share/dictd/gcide.dict.dz"
GCIDE_FIX = "or pass --source-file PATH (a gcide.dict.dz, e.g. /usr/share/dictd/gcide.dict.dz from dict-gcide)"
HEADWORD = re.compile(r"[^\s\\][^\\]*\\[^\\]+\\")
"""A headword line: the word at column 0, then its pronunciation between backslashes
("Zymose \\Zy*mose"\\, n."). The dictd header before the first such line is not dictionary text."""


def gcide_entries(text: str) -> Iterator[dict]:
    """The dictionary's entries in file order, each {"text", "headword"}.

    In the dictd text an entry starts with its headword at column 0; its body is indented, and
    a long headword line wraps to column 0. So a line at column 0 starts an entry when the
    previous line is blank or indented (a body line); after another column-0 line it continues
    the headword. Where the file puts two entries without that separation (rare: word lists such
    as "Unwrung / Unwrought ..."), they stay one document. The header (the 00-database-* entries:
    GPL notice, preface) ends at the first headword with a pronunciation and is skipped.
    """
    lines: List[str] = []
    started, after_body = False, True
    for line in text.split("\n"):
        if line[:1] and not line[0].isspace() and after_body:
            if started and lines:
                yield _entry(lines)
            lines = []
            started = started or bool(HEADWORD.match(line))
        if started:
            lines.append(line)
        after_body = not line.strip() or line[0].isspace()
    if started and lines:
        yield _entry(lines)


def _entry(lines: List[str]) -> dict:
    body = "\n".join(lines).strip("\n")
    first = lines[0]
    return {"text": body + "\n", "headword": first.split(" \\", 1)[0].rstrip(", ") if "\\" in first else first.strip()}


def decode_dictd(data: bytes) -> str:
    """The dictd file is ASCII with a few stray Windows-1252 bytes (3 in GCIDE 0.48: a ’, a ç
    and a superscript); they are read as Windows-1252 so that nothing is dropped."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return "\n".join(_decode_line(line) for line in data.split(b"\n"))


def _decode_line(line: bytes) -> str:
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError:
        return line.decode("cp1252", errors="replace")


def read_dictd(path: str) -> bytes:
    """The text of a dictd file: gzip/dictzip (.dz) or plain."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as err:
        raise InputError(f"--source-file: cannot read {path} ({err.strerror})") from None
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as err:
            raise InputError(f"--source-file: {path} is not a valid gzip/dictzip file ({err})") from None
    return data


def fetch_gcide(work: str) -> Tuple[str, dict]:
    """Download the Debian package into `work` and unpack it: (path of gcide.dict.dz, provenance).
    Needs apt-get and dpkg-deb (not root: `apt-get download` reads the apt lists)."""
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise InputError(f"gcide: {tool} not found (the corpus comes from the Debian package "
                             f"{GCIDE_PACKAGE}); install it, {GCIDE_FIX}")
    _run(["apt-get", "download", GCIDE_PACKAGE], work, "apt-get download failed")
    debs = sorted(glob.glob(str(Path(work) / f"{GCIDE_PACKAGE}_*.deb")))
    if not debs:
        raise InputError(f"gcide: apt-get download left no {GCIDE_PACKAGE}_*.deb in {work}; {GCIDE_FIX}")
    version = _run(["dpkg-deb", "-f", debs[-1], "Version"], work, "dpkg-deb cannot read the package").strip()
    unpacked = str(Path(work) / "unpacked")
    _run(["dpkg-deb", "-x", debs[-1], unpacked], work, "dpkg-deb -x failed")
    path = str(Path(unpacked) / GCIDE_FILE)
    if not Path(path).is_file():
        raise InputError(f"gcide: the package {Path(debs[-1]).name} has no /{GCIDE_FILE}; {GCIDE_FIX}")
    return path, {"package": GCIDE_PACKAGE, "version": version, "deb": Path(debs[-1]).name}


def _run(command: List[str], cwd: str, what: str) -> str:
    try:
        done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600,
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise InputError(f"gcide: {what} ({err}); {GCIDE_FIX}") from None
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no message"])[-1]
        hint = " (run `apt-get update` first if the package is unknown)" if command[0] == "apt-get" else ""
        raise InputError(f"gcide: {what}: {last}{hint}; {GCIDE_FIX}")
    return done.stdout


def _gcide_documents(max_bytes: int, source_file: Optional[str]) -> Documents:
    """Entries in file order while they fit in max_bytes (a prefix: A, B, ...)."""
    with tempfile.TemporaryDirectory(prefix="gcide-") as work:
        path, provenance = (source_file, {"source_file": source_file}) if source_file else fetch_gcide(work)
        data = read_dictd(path)
    provenance["sha256"] = hashlib.sha256(data).hexdigest()
    docs, total = [], 0
    for entry in gcide_entries(decode_dictd(data)):
        size = len(entry["text"].encode("utf-8"))
        if total + size > max_bytes:
            break
        docs.append(entry)
        total += size
    if not docs:
        where = f"--source-file: {source_file}" if source_file else f"gcide: the package {GCIDE_PACKAGE}"
        raise InputError(f"{where} has no dictionary entries within max_bytes={max_bytes} (expected dictd "
                         f"text: a headword with its \\pronunciation\\ at column 0, an indented body)")
    return docs, provenance


SOURCES: Dict[str, CorpusSource] = {
    # 32 MB: CPython 3.11's stdlib without tests is ~12 MB, so all of it (~3.2M tokens at vocab 8192)
    "stdlib": CorpusSource("stdlib", "Python standard library sources (the running interpreter's)",
                           32_000_000, _stdlib_documents, _stdlib_recipe),
    "gcide": CorpusSource("gcide", "GCIDE: the GNU Collaborative International Dictionary of English "
                                   "(Debian package dict-gcide; GPL), one document per entry",
                          # 64 MB: GCIDE 0.48 is ~40 MB of entries, so all of it
                          64_000_000, _gcide_documents, lambda: {"source": "gcide"}, takes_source_file=True),
}
