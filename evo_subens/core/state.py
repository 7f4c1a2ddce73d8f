"""The state of a run between stages: what a checkpoint holds besides the config and the RNGs.

A run moves through :data:`STAGES`; every stage ends by checkpointing a :class:`RunState`, so a resumed
run knows exactly what is done::

    >>> state = RunState(stage="parent", parent_id="3f2a9c0d1e4b5a67")
    >>> RunState.from_dict(state.to_dict()) == state
    True
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

# parent: trained (or loaded) and stored; search: some generations done (one checkpoint each);
# members: candidates selected; finetune: some selected members tuned and stored (one checkpoint each);
# accepted: the ensemble decided; done: metrics written.
STAGES = ("parent", "search", "members", "finetune", "accepted", "done")


@dataclass
class RunState:
    """Where a run stands. Members are referred to by *position*: the index in ``members``."""

    stage: str
    parent_id: str                                      # fingerprint of the parent's weights
    search: dict | None = None                          # SubnetworkSearch.state_dict(); None before the search
    checks: list[dict] = field(default_factory=list)    # per generation: its best candidate on held-back data
    members: list[int] = field(default_factory=list)    # candidate ids selected for the ensemble, by position
    tuned: int = 0                                      # positions whose final weights are stored
    decided: int = 0                                    # positions acceptance has ruled on
    accepted: list[int] | None = None                   # positions in the ensemble; None: every position
    selection: dict | None = None                       # the selection rules' comparison (first selection only)
    grow: int | None = None                             # candidates a grow adds; None outside a grow
    rng: dict | None = None                             # the global RNGs when the checkpoint was written

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"unknown run stage {self.stage!r}; expected one of {', '.join(STAGES)}")

    @property
    def ensemble(self) -> list[int]:
        """Positions of the ensemble's members (checkpoints written before acceptance existed: all)."""
        return list(range(len(self.members))) if self.accepted is None else list(self.accepted)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for a checkpoint (the RNG state is captured by the checkpoint itself)."""
        data = dataclasses.asdict(self)
        data.pop("rng")
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunState":
        """The state in a checkpoint; keys a checkpoint does not know (format, config, ...) are ignored and
        keys older checkpoints lack take their defaults."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in known})


@dataclass
class RunResult:
    """What a run produced; everything here is also in ``run_dir``."""

    run_dir: Path
    metrics: dict
    population: pd.DataFrame
    member_genomes: list[str]
