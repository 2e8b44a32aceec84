"""neox-sophia: the Sophia second-order optimizer for GPT-NeoX-style scale-out training."""
__version__ = "0.1.0"
