"""A finished run's ensemble as models: for predicting with it, or for looking inside its members.

    >>> import evo_subens
    >>> ensemble = evo_subens.load_ensemble("runs/default-s0-20261126-033727")
    >>> probs = ensemble.predict_probs(x)           # softmax average of the members
    >>> ensemble.parent, ensemble.members[0]         # torch modules in eval mode
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .core.config import RunConfig, config_from_dict
from .tasks.classification.data import DatasetSplits, load_dataset
from .errors import RunDirError
from .families import make_family
from .core.logs import read_run_config
from .tasks.classification.models import build_model, load_parent_state
from .nn import state_copy
from .tasks.classification.training import predict_probs


@dataclass
class LoadedEnsemble:
    """The parent and the members of a run, with the config and data splits they were made with."""

    config: RunConfig
    data: DatasetSplits
    parent: nn.Module | None
    members: list[nn.Module]

    def predict_probs(self, x: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
        """The ensemble's prediction: the mean of the members' softmax outputs."""
        return torch.stack([predict_probs(m, x, batch_size) for m in self.members]).mean(dim=0)


def _members_file(run_dir: Path) -> list[dict]:
    path = run_dir / "members.json"
    if not path.is_file():
        raise RunDirError(f"{path} does not exist: the run has not finished (evo-subens resume {run_dir})")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise RunDirError(f"{path} is not valid JSON ({exc})") from None


def _load_weights(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise RunDirError(f"member weights {path} are missing")
    return torch.load(path, map_location="cpu", weights_only=True)


def load_ensemble(run_dir: str | Path, data: DatasetSplits | None = None) -> LoadedEnsemble:
    """Rebuild a finished run's parent and members (``data``: the run's splits, loaded when None).

    Members stored in ``members/`` are loaded (and unpacked by their family); the others are rebuilt from
    their genomes on the parent, bit for bit the weights the run evaluated.
    """
    run_dir = Path(run_dir)
    cfg = config_from_dict(read_run_config(run_dir))
    entries = _members_file(run_dir)
    data = data if data is not None else load_dataset(cfg.data)

    def fresh_model() -> nn.Module:
        return build_model(cfg.model, data.input_shape, data.num_classes)

    parent = None
    if (run_dir / "parent.pt").is_file():
        parent = fresh_model()
        load_parent_state(run_dir / "parent.pt", parent)
        parent.eval()
    family = make_family(cfg.children) if parent is not None else None
    materialiser = None
    if family is not None:
        workspace = fresh_model()
        workspace.load_state_dict(parent.state_dict())
        materialiser = family.bind(workspace)
    members = []
    for entry in entries:
        genome = entry.get("genome")
        if entry.get("weights"):
            state = _load_weights(run_dir / entry["weights"])
            if family is not None and genome:
                state = family.unpack(state, genome, materialiser)
        elif materialiser is not None and genome:
            with materialiser.materialised(genome):
                state = state_copy(workspace)
        else:
            raise RunDirError(f"{run_dir / 'members.json'}: member {entry} has neither weights nor a genome")
        model = fresh_model()
        model.load_state_dict(state)
        members.append(model.eval())
    return LoadedEnsemble(cfg, data, parent, members)
