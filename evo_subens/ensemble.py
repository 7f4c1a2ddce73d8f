"""A finished run's ensemble as one ``torch.nn.Module``: it predicts from data in its raw form, with no
dataset and no run machinery, and can be exported (``evo_subens.export``).

    >>> import evo_subens
    >>> ensemble = evo_subens.load_ensemble("runs/default-s0-20261126-033727")
    >>> probs = ensemble.predict_proba(x)        # one sample or a batch: (C,) or (B, C)
    >>> labels = ensemble.classes_[ensemble.predict(x)]   # predict gives class indices
    >>> ensemble(x_batch)                        # the module itself: (B, C) probabilities, with gradients
    >>> ensemble.parent, ensemble.members[0]     # plain torch modules in eval mode, for analysis

What :meth:`Ensemble.predict_proba`, :meth:`~Ensemble.predict` and :meth:`~Ensemble.member_probs` take:

- numpy arrays, lists, tuples and torch tensors of one sample (``input_shape``) or a batch; numbers only.
  Everything but a tensor gives numpy back; a tensor gives a tensor on its own device.
- pandas DataFrames (one row a sample; a Series is one sample): where the run recorded the CSV's feature
  columns (``features``) they are taken by name, in the recorded order; columns it did not use are ignored
  (taken by name, they cannot shift the others); a missing, non-numeric or empty column is a ValueError
  naming it. Where no names were recorded, the columns are taken in order if their count fits.
- for image runs (``image``, see :class:`~evo_subens.data_info.ImageForm`): PIL images (any mode; converted
  to the run's), (height, width, channels) arrays, grayscale (height, width) arrays and batches or lists of
  these. Images of another size are resized as the run resized its files (Pillow, bilinear) where it did so
  and the pixels are PIL images or uint8 arrays; otherwise a ValueError names the size to use.

The module itself (``ensemble(x)``) and the exported files take only the model's raw batch form: a tensor
(B, *input_shape), for image runs channels first at the run's size; another shape is a ValueError naming
the expected one.

The members run as one batched forward pass: their weights are stacked (``torch.func.stack_module_state``)
and the shared architecture is called with ``torch.func.functional_call`` under ``torch.func.vmap``. An
architecture vmap cannot run (data-dependent control flow, ``.item()``) is run member by member instead.
"""

from __future__ import annotations

import copy
import json
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from .core.config import RunConfig, config_from_dict
from .core.logs import read_run_config
from .data_info import DataInfo, ImageForm, InputTransform, pil_images, read_data_info
from .errors import RunDirError
from .families import make_family
from .nn import load_parent_state, load_state_file, state_copy
from .packed import PackedEnsemble
from .tasks.classification.models import build_model

__all__ = ["Ensemble", "PackedRunEnsemble", "load_ensemble"]


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

    ``features``: the input's column names in order (a CSV run's), so DataFrames are matched by name.
    ``image``: an image run's raw form (``data.json``'s record: size, Pillow mode, resizing), so PIL images
    and channels-last arrays are taken too.
    """

    def __init__(self, members: Sequence[nn.Module], *, input_shape: Sequence[int], num_classes: int,
                 transform: Mapping[str, Any] | None = None, classes: Sequence[str] | None = None,
                 config: RunConfig | None = None, parent: nn.Module | None = None,
                 features: Sequence[str] | None = None, image: Mapping[str, Any] | None = None):
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.transform = InputTransform(transform)
        self.stack = _stacked_copy(members).eval()
        self.input_shape = tuple(int(s) for s in input_shape)
        self.num_classes = int(num_classes)
        self.classes = list(classes) if classes is not None else None
        if self.classes is not None and len(self.classes) != self.num_classes:
            raise ValueError(f"classes names {len(self.classes)} classes, num_classes is {self.num_classes}")
        self.features = [str(f) for f in features] if features is not None else None
        if self.features is not None and (len(self.input_shape) != 1 or len(self.features) != self.input_shape[0]):
            raise ValueError(f"features names {len(self.features)} columns; samples of shape {self.input_shape} "
                             f"need one name per feature of a one-dimensional sample")
        self.image = ImageForm.from_dict(image, self.input_shape) if image is not None else None
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
    def classes_(self) -> np.ndarray:
        """The label of each class index, as scikit-learn's classifiers give it: the data's class names or
        numbers where the run recorded them, else 0..C-1. ``classes_[predict(x)]`` are labels."""
        return np.asarray(self.classes) if self.classes is not None else np.arange(self.num_classes)

    @property
    def feature_names_in_(self) -> np.ndarray:
        """The input's column names in order, as scikit-learn gives them; absent (``hasattr`` is False) where
        the run recorded none."""
        if self.features is None:
            raise AttributeError("this ensemble's run recorded no feature names (only csv runs do)")
        return np.asarray(self.features, dtype=object)

    @property
    def num_members(self) -> int:
        """How many members are averaged."""
        return len(self.members)

    # ---- the module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Mean of the members' softmax probabilities on a raw batch ``x`` of shape (B, *input_shape); any
        other shape is a ValueError naming that one (:meth:`prepare` brings other forms to it)."""
        if x.dim() != len(self.input_shape) + 1 or tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"expected {self.expected_input()}, got a tensor of shape {tuple(x.shape)}")
        return self.stacked_probs(self.transform(x)).mean(dim=0)

    def expected_input(self, what: str = "a batch") -> str:
        """The module's input in words (``what`` of shape ...): its shape and, where known, the columns or the
        image form."""
        shape = f"{what} of shape (B, {', '.join(map(str, self.input_shape))})"
        if self.image is not None:
            return f"{shape}: {self.image.describe()}"
        if self.features is not None:
            names = ", ".join(map(repr, self.features[:8])) + (", ..." if len(self.features) > 8 else "")
            return f"{shape}: the columns {names} in that order"
        return shape

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

    def predict_proba(self, x: Any, batch_size: int = 1024) -> np.ndarray | torch.Tensor:
        """Mean member probabilities for one raw sample (returns (C,)) or a batch (returns (B, C)), in any
        form the module docstring lists; numpy back for all but a tensor, which comes back on its device.
        Runs without gradients, in eval mode, ``batch_size`` samples at a time."""
        return self._predict(x, batch_size, lambda batch: self.forward(batch), sample_axis=0)

    def predict(self, x: Any, batch_size: int = 1024) -> np.ndarray | torch.Tensor:
        """Class indices of :meth:`predict_proba`'s argmax; ``classes_[i]`` is the label of class ``i``."""
        probs = self.predict_proba(x, batch_size)
        return probs.argmax(axis=-1) if isinstance(probs, np.ndarray) else probs.argmax(dim=-1)

    def member_probs(self, x: Any, batch_size: int = 1024) -> np.ndarray | torch.Tensor:
        """Each member's probabilities: (M, B, C) for a batch, (M, C) for one sample; as :meth:`predict_proba`."""
        return self._predict(x, batch_size, lambda batch: self.stacked_probs(self.transform(batch)), sample_axis=1)

    def prepare(self, x: Any) -> torch.Tensor:
        """``x``, in any form :meth:`predict_proba` takes, as the module's input: a (B, *input_shape) tensor
        (on ``x``'s device for a tensor, else on the CPU)."""
        return self._samples(x)[0]

    def _samples(self, x: Any) -> tuple[torch.Tensor, bool, bool]:
        """``x`` as a (B, *input_shape) tensor, whether it was one sample, whether numpy goes back."""
        if isinstance(x, torch.Tensor):
            batch, single = self._batch(x)
            return batch, single, False
        images = pil_images(x)
        if images is not None:
            if self.image is None:
                raise ValueError(f"PIL images are taken by ensembles of image runs (imagefolder, cifar); this "
                                 f"one takes {self.expected_input()}")
            return _tensor(self.image.from_pil(images[0])), images[1], True
        frame = _pandas_rows(x)
        if frame is not None:
            return _tensor(self._frame_values(frame[0])), frame[1], True
        try:
            array = np.asarray(x)
        except (TypeError, ValueError) as exc:  # ragged nested lists
            raise ValueError(f"expected numbers in the form of {self.expected_input()} ({exc})") from None
        if array.dtype.kind not in "biuf":
            raise ValueError(f"expected numbers in the form of {self.expected_input()}; got an array of dtype "
                             f"{array.dtype}")
        batch, single = self._batch(array)
        return _tensor(batch), single, True

    def _batch(self, x: np.ndarray | torch.Tensor) -> tuple[np.ndarray | torch.Tensor, bool]:
        shape = tuple(x.shape)
        if shape == self.input_shape:
            return x[None], True
        if shape[1:] == self.input_shape:
            return x, False
        if self.image is not None:
            return self.image.layout(x)
        raise ValueError(f"expected one sample of shape {self.input_shape} or a batch of shape "
                         f"(N, {', '.join(map(str, self.input_shape))}), got {shape}")

    def _frame_values(self, frame: Any) -> np.ndarray:
        """A DataFrame's rows as float32 samples: the recorded feature columns by name, else in order."""
        if self.features is not None:
            by_name = {str(c): c for c in frame.columns}
            missing = [f for f in self.features if f not in by_name]
            if missing:
                raise ValueError(f"the DataFrame lacks the feature column(s) {', '.join(map(repr, missing[:8]))}"
                                 f"{' ...' if len(missing) > 8 else ''}; this ensemble takes the columns "
                                 f"{', '.join(map(repr, self.features))} (matched by name, others ignored)")
            if len(by_name) != len(frame.columns):
                doubled = sorted({str(c) for c in frame.columns if list(map(str, frame.columns)).count(str(c)) > 1})
                raise ValueError(f"the DataFrame has more than one column named {', '.join(map(repr, doubled))}")
            frame = frame[[by_name[f] for f in self.features]]
        elif frame.shape[1] != math.prod(self.input_shape):
            raise ValueError(f"this ensemble's run recorded no feature names, so a DataFrame's columns are taken in "
                             f"order; it needs {math.prod(self.input_shape)} columns (samples of shape "
                             f"{self.input_shape}), got {frame.shape[1]}")
        text = [str(c) for c in frame.columns if frame[c].dtype.kind not in "biuf"]
        if text:
            raise ValueError(f"feature columns must be numeric, as in the run's data; {', '.join(map(repr, text[:5]))} "
                             f"{'is' if len(text) == 1 else 'are'} not")
        empty = [str(c) for c in frame.columns if frame[c].isna().any()]
        if empty:
            raise ValueError(f"feature columns with empty cells: {', '.join(map(repr, empty[:5]))} (the run's data "
                             f"had none; fill or drop them first)")
        return frame.to_numpy(dtype=np.float32).reshape(-1, *self.input_shape)

    def _predict(self, x: Any, batch_size: int, run: Any, sample_axis: int) -> np.ndarray | torch.Tensor:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        tensor, single, to_numpy = self._samples(x)
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
        return out.cpu().numpy() if to_numpy else out.to(tensor.device)

    def extra_repr(self) -> str:
        return (f"members={self.num_members}, input_shape={self.input_shape}, num_classes={self.num_classes}, "
                f"vectorise={self.vectorise}")


class PackedRunEnsemble(Ensemble):
    """A packed run's ensemble (``method: packed``): the members run as one network of grouped layers,
    :attr:`packed` (an :class:`~evo_subens.packed.PackedEnsemble`), whose parameters are this module's.
    :attr:`members` are its members unpacked into separate plain networks, for analysis and comparison
    (``Ensemble(ensemble.members, ...)`` runs the same members one by one or vmapped)."""

    def __init__(self, packed: PackedEnsemble, **kwargs: Any):
        super().__init__(packed.unpack(), **kwargs)
        del self.stack  # the state is the packed network's alone
        self.packed = packed.eval()
        self.vectorise = False

    def stacked_probs(self, x: torch.Tensor) -> torch.Tensor:
        """Each member's softmax probabilities, (M, B, C), from one pass of the packed network."""
        return self.packed.member_logits(x).softmax(dim=-1).transpose(0, 1)

    def extra_repr(self) -> str:
        return (f"members={self.num_members}, input_shape={self.input_shape}, num_classes={self.num_classes}, "
                f"packed=True")


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

    form = dict(input_shape=info.input_shape, num_classes=info.num_classes, transform=info.transform,
                classes=info.classes, config=cfg, features=info.features, image=info.image)
    if cfg.method == "packed":
        from .tasks.classification.packed_run import load_packed

        parent = fresh_model()
        load_parent_state(run_dir / "parent.pt", parent)
        packed = load_packed(run_dir, cfg, parent, info.input_shape, int(entries[0].get("candidate", 0)))
        return PackedRunEnsemble(packed, parent=parent.eval(), **form)

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
    return Ensemble(members, parent=parent, **form)


def _tensor(array: np.ndarray) -> torch.Tensor:
    """``array`` as a CPU tensor, copied only where torch cannot share it (read-only or strided memory, as
    pandas and numpy views give)."""
    array = np.ascontiguousarray(array)
    return torch.from_numpy(array if array.flags.writeable else array.copy())


def _pandas_rows(x: Any) -> tuple[Any, bool] | None:
    """A DataFrame as it is (a batch), a Series as a one-row DataFrame (one sample); None for anything else.
    pandas is never imported here: where it is not loaded, nothing is a DataFrame."""
    pandas = sys.modules.get("pandas")
    if pandas is None:
        return None
    if isinstance(x, pandas.DataFrame):
        return x, False
    if isinstance(x, pandas.Series):
        return pandas.DataFrame([x.to_numpy()], columns=x.index).infer_objects(), True
    return None
