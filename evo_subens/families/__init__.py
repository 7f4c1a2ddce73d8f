"""Child families: the registry from a family's name to its :class:`Family` class.

The registry is the one list of families: ``children.family`` accepts its names, ``evo-subens config
--fields`` documents their sections. Entries are ``"module:Class"`` strings, imported on first use, so
reading the registry costs nothing. A family defined elsewhere (your package, a test) joins with
:func:`register_family`::

    register_family("scaled", ScaledFamily)      # or register_family("scaled", "my_pkg.scaled:ScaledFamily")
"""

from __future__ import annotations

import importlib

from ..core.config import ChildrenConfig
from ..errors import ConfigError
from .base import ChildTrainer, Family, Materialiser, ReportSection, decode_genome, encode_genome

FAMILIES: dict[str, str | type[Family]] = {
    "noisy": "evo_subens.families.noisy:NoisyFamily",
    "sparse": "evo_subens.families.sparse:SparseFamily",
    "stochastic": "evo_subens.families.stochastic:StochasticFamily",
}


def register_family(name: str, family: str | type[Family]) -> None:
    """Make ``family`` (a :class:`Family` subclass, or its ``"module:Class"``) the family ``name``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"a family name must be a non-empty string, got {name!r}")
    FAMILIES[name] = family


def family_class(name: object, *, field: str = "children.family") -> type[Family]:
    """The :class:`Family` class registered as ``name``; :class:`ConfigError` on ``field`` for another name."""
    if not isinstance(name, str) or name not in FAMILIES:
        raise ConfigError(field, "one of " + ", ".join(repr(n) for n in FAMILIES), name)
    entry = FAMILIES[name]
    if isinstance(entry, str):
        module, _, attribute = entry.partition(":")
        entry = FAMILIES[name] = getattr(importlib.import_module(module), attribute)
    section = getattr(entry, "config", None)
    if entry.name != name or not (isinstance(section, type) and issubclass(section, ChildrenConfig)) \
            or section.__dataclass_fields__["family"].default != name:
        raise TypeError(f"family {name!r} is registered as {entry.__name__}: its name and its config section's "
                        f"family default must be {name!r}, and the section a ChildrenConfig subclass")
    return entry


def make_family(cfg: ChildrenConfig) -> Family:
    """The family named by ``cfg.family``, configured by ``cfg`` (that family's config section)."""
    return family_class(cfg.family)(cfg)


__all__ = ["FAMILIES", "ChildTrainer", "Family", "Materialiser", "ReportSection", "decode_genome", "encode_genome",
           "family_class", "make_family", "register_family"]
