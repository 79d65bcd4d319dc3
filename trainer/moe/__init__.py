"""Mixture-of-Experts building blocks; `MoE` is the public, drop-in layer."""

from .collectives import CollectiveError
from .dispatch import LoadError
from .experts import Experts, expert_parameters
from .join import all_finished
from .layer import MoE, MoEOutput, MoEStats
from .router import Router, Routing

__all__ = ["CollectiveError", "LoadError", "Experts", "MoE", "MoEOutput", "MoEStats", "Router", "Routing", "all_finished", "expert_parameters"]
