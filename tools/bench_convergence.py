"""Convergence benchmark: AdamW against Sophia (the paper's Sophia-G and named variants), each
tuned on a grid by validation loss. The code is neox_sophia/bench/ (cli.py says what it does and
how to run it); this file is its command line:

    python tools/bench_convergence.py --help
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from neox_sophia.bench.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
