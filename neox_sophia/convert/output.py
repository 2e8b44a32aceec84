"""Conversion outputs are written whole or not at all, and replace an existing directory only
when asked: each is built in a temporary sibling directory and renamed into place. Its folders and
files get the permissions the umask gives any new file (0755 / 0644 under the usual 022): the
temporary directory (0700) and safetensors' files (0600) would otherwise hide the model from the
other users of a shared cluster."""
from __future__ import annotations

import os
import shutil
import tempfile
from typing import Callable


def check_output_dir(out_dir: str, overwrite: bool) -> None:
    if os.path.lexists(out_dir):
        if not os.path.isdir(out_dir) or os.path.islink(out_dir):
            raise FileExistsError(f"{out_dir}: exists and is not a directory; choose another output")
        if os.listdir(out_dir) and not overwrite:
            raise FileExistsError(f"{out_dir}: exists and is not empty; choose another output or pass "
                                  f"overwrite=True (--overwrite) to replace it")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def follow_umask(root: str) -> None:
    """Give ``root`` and everything under it the mode a plain new folder or file would get."""
    mask = _umask()
    os.chmod(root, 0o777 & ~mask)
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            os.chmod(os.path.join(folder, name), 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(folder, name), 0o666 & ~mask)


def write_directory(out_dir: str, overwrite: bool, fill: Callable[[str], None]) -> None:
    """Build the directory in a temporary sibling, then rename it into place."""
    out_dir = os.path.abspath(out_dir)
    parent, base = os.path.split(out_dir)
    os.makedirs(parent, exist_ok=True)
    check_output_dir(out_dir, overwrite)
    tmp = tempfile.mkdtemp(prefix=f".{base}.tmp-", dir=parent)
    try:
        fill(tmp)
        follow_umask(tmp)
        if os.path.exists(out_dir):
            old = tempfile.mkdtemp(prefix=f".{base}.old-", dir=parent)
            os.rename(out_dir, old)  # onto the empty directory mkdtemp made
            try:
                os.rename(tmp, out_dir)
            except BaseException:
                os.rename(old, out_dir)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
