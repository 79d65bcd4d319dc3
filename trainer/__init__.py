"""Expert-parallel Mixture-of-Experts trainer."""

__version__ = "0.1.0"
