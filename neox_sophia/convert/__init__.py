"""Checkpoint tools: consolidate any TP x PP x ZeRO checkpoint, convert to and from Hugging Face.

    read_checkpoint(save_dir, step=None)  -> FullCheckpoint   (neox_sophia.convert.reader)
    save_universal(out_dir, ckpt) / load_universal(dir)       (neox_sophia.convert.universal)
    summarize(path, step=None) -> dict; render(summary) -> str (neox_sophia.convert.summary)

Imported lazily: `import neox_sophia.convert` costs nothing until one of these is used.
"""
from importlib import import_module

_EXPORTS = {"FullCheckpoint": "reader", "read_checkpoint": "reader", "save_universal": "universal",
            "load_universal": "universal", "summarize": "summary", "render": "summary"}


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = list(_EXPORTS)
