"""The training loop (loop.py), its steps (steps.py), checkpoints and metrics."""
