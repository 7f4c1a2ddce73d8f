"""A finished run's ensemble as one ``torch.nn.Module``: it predicts from data in its raw form, with no
dataset and no run machinery, and can be exported (``evo_subens.export``).

    >>> import evo_subens
    >>> ensemble = evo_subens.load_ensemble("runs/default-s0-20261126-033727")
    >>> probs = ensemble.predict_proba(x)        # numpy or torch, one sample or a batch
    >>> labels = ensemble.predict(x)             # class indices; ensemble.classes names them when known
    >>> ensemble(x_batch)                        # the module itself: (B, C) probabilities, with gradients
    >>> ensemble.parent, ensemble.members[0]     # plain torch modules in eval mode, for analysis

The members run as one batched forward pass: their weights are stacked (``torch.func.stack_module_state``)
and the shared architecture is called with ``torch.func.functional_call`` under ``torch.func.vmap``. An
architecture vmap cannot run (data-dependent control flow, ``.item()``) is run member by member instead.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from .core.config import RunConfig, config_from_dict
from .core.logs import read_run_config
from .data_info import DataInfo, InputTransform, read_data_info
from .errors import RunDirError
from .families import make_family
from .nn import load_parent_state, load_state_file, state_copy
from .tasks.classification.models import build_model

__all__ = ["Ensemble", "load_ensemble"]


def _stacked_copy(members: Sequence[nn.Module]) -> nn.Module:
    """A copy of the first member whose every parameter and buffer holds all members' values, stacked
    along a new first dimension; used only as the template of ``functional_call``, never called directly."""
    params, buffers = stack_module_state(list(members))
    template = copy.deepcopy(members[0])
    # Every alias of a tied parameter gets the same stacked one, so the ties hold in the template too.
    stacked_by_id = {}
    for name, param in members[0].named_parameters():
        stacked_by_id[id(param)] = nn.Parameter(params[name].detach(), requires_grad=param.requires_grad)
    for name, param in members[0].named_parameters(remove_duplicate=False):
        owner, _, leaf = name.rpartition(".")
        template.get_submodule(owner)._parameters[leaf] = stacked_by_id[id(param)]
    for name, value in buffers.items():
        owner, _, leaf = name.rpartition(".")
        template.get_submodule(owner)._buffers[leaf] = value
    return template


class Ensemble(nn.Module):
    """Members of one architecture averaged in probability: ``forward(x)`` takes a batch in the data's raw
    form, applies :attr:`transform` and returns the mean of the members' softmax outputs, shape (B, C).

    The stacked member weights (``stack.*``, each with a leading member dimension) and the transform's
    constants are this module's state: ``.to(device)`` moves them and ``state_dict()`` holds them.
    :attr:`parent` and :attr:`members` are separate plain copies for analysis (the report's feature grid
    uses them); they are not part of that state and stay where they are.
    """

    def __init__(self, members: Sequence[nn.Module], *, input_shape: Sequence[int], num_classes: int,
                 transform: Mapping[str, Any] | None = None, classes: Sequence[str] | None = None,
                 config: RunConfig | None = None, parent: nn.Module | None = None):
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.transform = InputTransform(transform)
        self.stack = _stacked_copy(members).eval()
        self.input_shape = tuple(int(s) for s in input_shape)
        self.num_classes = int(num_classes)
        self.classes = list(classes) if classes is not None else None
        self.config = config
        # Kept out of the module tree (not registered), so the state above is the stack's alone.
        self.__dict__["parent"] = parent.eval() if parent is not None else None
        self.__dict__["members"] = [m.eval() for m in members]
        # False: the members run one by one. It turns False by itself when vmap cannot run the architecture,
        # and vmap_error then says why.
        self.vectorise = True
        self.vmap_error: str | None = None
        self.eval()

    @property
    def num_members(self) -> int:
        """How many members are averaged."""
        return len(self.members)

    # ---- the module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Mean of the members' softmax probabilities on a raw batch ``x`` of shape (B, *input_shape)."""
        return self.stacked_probs(self.transform(x)).mean(dim=0)

    def stacked_probs(self, x: torch.Tensor) -> torch.Tensor:
        """Each member's softmax probabilities on a batch already in model-input form: (M, B, C)."""
        if not self.vectorise:
            return self.looped_probs(x)
        try:
            return self.vmapped_probs(x)
        except Exception as exc:
            # The loop decides whose fault it was: an input the members reject fails there too (and that
            # error is the one raised); otherwise vmap cannot run this architecture, and is not tried again.
            probs = self.looped_probs(x)
            self.vectorise, self.vmap_error = False, f"{type(exc).__name__}: {exc}"
            return probs

    def vmapped_probs(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`stacked_probs` as one vmapped call over the stacked weights."""
        params, buffers = dict(self.stack.named_parameters()), dict(self.stack.named_buffers())

        def member(p: dict, b: dict, inputs: torch.Tensor) -> torch.Tensor:
            return functional_call(self.stack, (p, b), (inputs,)).softmax(dim=-1)

        # "different": in training mode each member draws its own dropout masks, as separate models would.
        return vmap(member, in_dims=(0, 0, None), randomness="different")(params, buffers, x)

    def looped_probs(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`stacked_probs` member by member, each with its slice of the stacked weights."""
        params, buffers = dict(self.stack.named_parameters()), dict(self.stack.named_buffers())
        return torch.stack([
            functional_call(self.stack, ({k: v[i] for k, v in params.items()}, {k: v[i] for k, v in buffers.items()}),
                            (x,)).softmax(dim=-1)
            for i in range(self.num_members)])

    # ---- prediction

    def predict_proba(self, x: np.ndarray | torch.Tensor, batch_size: int = 1024) -> np.ndarray | torch.Tensor:
        """Mean member probabilities for one raw sample (shape ``input_shape``: returns (C,)) or a batch
        (returns (B, C)); numpy in, numpy out; a tensor comes back on the device it came from. Runs without
        gradients, in eval mode, ``batch_size`` samples at a time."""
        return self._predict(x, batch_size, lambda batch: self.forward(batch), sample_axis=0)

    def predict(self, x: np.ndarray | torch.Tensor, batch_size: int = 1024) -> np.ndarray | torch.Tensor:
        """Class indices of :meth:`predict_proba`'s argmax (``classes[i]`` names class ``i`` when known)."""
        probs = self.predict_proba(x, batch_size)
        return probs.argmax(axis=-1) if isinstance(probs, np.ndarray) else probs.argmax(dim=-1)

    def member_probs(self, x: np.ndarray | torch.Tensor, batch_size: int = 1024) -> np.ndarray | torch.Tensor:
        """Each member's probabilities: (M, B, C) for a batch, (M, C) for one sample; as :meth:`predict_proba`."""
        return self._predict(x, batch_size, lambda batch: self.stacked_probs(self.transform(batch)), sample_axis=1)

    def _predict(self, x: np.ndarray | torch.Tensor, batch_size: int, run: Any, sample_axis: int
                 ) -> np.ndarray | torch.Tensor:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        is_numpy = isinstance(x, np.ndarray)
        tensor = torch.from_numpy(np.ascontiguousarray(x)) if is_numpy else torch.as_tensor(x)
        single = tuple(tensor.shape) == self.input_shape
        if single:
            tensor = tensor.unsqueeze(0)
        elif tuple(tensor.shape[1:]) != self.input_shape:
            raise ValueError(f"expected one sample of shape {self.input_shape} or a batch of shape "
                             f"(N, {', '.join(map(str, self.input_shape))}), got {tuple(tensor.shape)}")
        device = self.transform.scale.device
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                chunks = [run(tensor[i:i + batch_size].to(device)) for i in range(0, len(tensor), batch_size)]
        finally:
            self.train(was_training)
        if chunks:
            out = torch.cat(chunks, dim=sample_axis)
        else:
            shape = (0, self.num_classes) if sample_axis == 0 else (self.num_members, 0, self.num_classes)
            out = torch.zeros(shape, device=device)
        if single:
            out = out.squeeze(sample_axis)
        return out.cpu().numpy() if is_numpy else out.to(tensor.device)

    def extra_repr(self) -> str:
        return (f"members={self.num_members}, input_shape={self.input_shape}, num_classes={self.num_classes}, "
                f"vectorise={self.vectorise}")


# ------------------------------------------------------------------------------------------ loading a run

def _members_file(run_dir: Path) -> list[dict]:
    path = run_dir / "members.json"
    if not path.is_file():
        raise RunDirError(f"{path} does not exist: the run has not finished (evo-subens resume {run_dir})")
    try:
        entries = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RunDirError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
        raise RunDirError(f"{path} should hold a non-empty list of members (JSON objects)")
    return entries


def _load_weights(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise RunDirError(f"member weights {path} are missing")
    try:
        return load_state_file(path)
    except Exception as exc:  # the readers raise many types on truncated or foreign files
        raise RunDirError(f"member weights {path} are unreadable ({type(exc).__name__}: {exc})") from None


def _data_info(run_dir: Path, cfg: RunConfig) -> DataInfo:
    """The run's ``data.json``; runs made before it existed describe their data only through the config, so
    the dataset is loaded for its shape (their built-in datasets need no transform)."""
    info = read_data_info(run_dir)
    if info is not None:
        return info
    from .tasks.classification.data import load_dataset

    data = load_dataset(cfg.data)
    return DataInfo(tuple(data.input_shape), data.num_classes)


def load_ensemble(run_dir: str | Path) -> Ensemble:
    """A finished run's ensemble (eval mode), with its parent and members.

    Members stored in ``members/`` are loaded (and unpacked by their family); the others are rebuilt from
    their genomes on the parent, bit for bit the weights the run evaluated.
    """
    run_dir = Path(run_dir)
    cfg = config_from_dict(read_run_config(run_dir))
    if cfg.task != "classification":
        raise RunDirError(f"{run_dir} is a run of the {cfg.task} task: load_ensemble and export build classifier ensembles "
                          f"(its metrics.json and report.md hold the ensemble policy's returns)")
    entries = _members_file(run_dir)
    info = _data_info(run_dir, cfg)

    def fresh_model() -> nn.Module:
        return build_model(cfg.model, info.input_shape, info.num_classes)

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
    return Ensemble(members, input_shape=info.input_shape, num_classes=info.num_classes,
                    transform=info.transform, classes=info.classes, config=cfg, parent=parent)
