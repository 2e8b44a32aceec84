"""Optimizers: Sophia's update (sophia.py, kernels.py) and its Hessian estimators (hessian.py)."""
from neox_sophia.optim.sophia import Sophia, SophiaStatistics

__all__ = ["Sophia", "SophiaStatistics"]
