"""Invertible Residual Networks (Behrmann et al., ICML 2019) in PyTorch."""

__version__ = "0.2.0.dev0"
