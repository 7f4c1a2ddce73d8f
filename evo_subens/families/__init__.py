"""Child families: registry from config name to :class:`Family` implementation."""

from __future__ import annotations

from ..core.config import ChildrenConfig
from .base import Family, Materialiser, decode_genome, encode_genome
from .noisy import NoisyFamily
from .sparse import SparseFamily
from .stochastic import StochasticFamily

FAMILIES: dict[str, type[Family]] = {"noisy": NoisyFamily, "sparse": SparseFamily, "stochastic": StochasticFamily}


def make_family(cfg: ChildrenConfig) -> Family:
    """The family named by ``cfg.family``, configured by ``cfg``."""
    return FAMILIES[cfg.family](cfg)


__all__ = ["FAMILIES", "Family", "Materialiser", "decode_genome", "encode_genome", "make_family"]
