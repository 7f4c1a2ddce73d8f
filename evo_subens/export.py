"""``evo-subens export``: a finished run's ensemble as one self-contained file, loadable without evo_subens.

- ``torchscript`` (``export/ensemble.pt``): ``torch.jit.load(path)(x)``;
- ``pt2`` (``export/ensemble.pt2``): ``torch.export.load(path).module()(x)``;
- ``onnx`` (``export/ensemble.onnx``): ``onnxruntime.InferenceSession(path).run(None, {"x": x})[0]``;
- ``safetensors`` (``export/ensemble.safetensors``): ``safetensors.torch.load_file(path)`` gives the members'
  weights (``member.{i}.{name}``); its metadata holds the JSON :func:`description` (architecture, input
  shape, classes, input transform) needed to rebuild and run them. A packed run's file holds its one packed
  network's weights (``packed.{name}``), with the layer layout in the description's ``packed``.

A packed run (``method: packed``) exports as its one packed network, at that network's cost.

The first three are the whole ensemble as a graph: a float32 batch of raw samples (any batch size) in,
the mean of the members' softmax probabilities out, the input transform included. They take the module's
raw batch form only, (batch, *input_shape): image runs' images channels first at the run's size (the graph
holds no resizing, which Pillow's bilinear filter does not match in ONNX or TorchScript), a CSV run's
columns in the recorded order; each file refuses another shape with the one it expects. They carry the same
JSON description (its ``input`` says that form in words; ``features`` and ``image`` record it): TorchScript
and pt2 as the extra file ``ensemble.json``, ONNX as the metadata entry ``evo_subens``.

    >>> export_ensemble("runs/default-s0-20261126-033727", "onnx")
    PosixPath('runs/default-s0-20261126-033727/export/ensemble.onnx')

``model="student"`` (``evo-subens export RUN_DIR --student``) exports the run's distilled student (made by
``evo-subens distill``) the same way, as a one-member ensemble: ``export/student.<suffix>``.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import __version__
from .core.logs import read_run_config
from .core.progress import say
from .core.rundir import atomic_write
from .ensemble import Ensemble, PackedRunEnsemble, load_ensemble
from .errors import ExportError, RunDirError

FORMATS: dict[str, str] = {"torchscript": ".pt", "pt2": ".pt2", "onnx": ".onnx", "safetensors": ".safetensors"}
MODELS = ("ensemble", "student")  # what export_ensemble writes: the run's ensemble, or its distilled student
FORMAT_VERSION = 1
DESCRIPTION_NAME = "ensemble.json"  # the description's name inside TorchScript and pt2 files
METADATA_KEY = "evo_subens"         # ... and its key in safetensors and ONNX metadata
EXAMPLE_BATCH = 2                   # torch.export treats sizes 0 and 1 as special: trace with a general one


def export_ensemble(run_dir: str | Path, fmt: str, out: str | Path | None = None, *, model: str = "ensemble",
                    progress: Callable[[str], None] = say) -> Path:
    """Write the ensemble of the finished run ``run_dir`` as ``fmt`` (one of :data:`FORMATS`) to ``out``
    (default ``run_dir/export/ensemble.<suffix>``), atomically; says what it wrote and returns the path.

    ``model="student"`` writes the run's distilled student instead (``evo-subens distill``; a one-member
    ensemble, :func:`evo_subens.distillation.load_student`), by default to ``run_dir/export/student.<suffix>``.

    Every problem the user can fix (unknown format, unfinished run, no student, unwritable path, a missing
    package) is an :class:`~evo_subens.errors.UserError`, raised before the ensemble is loaded."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if model not in MODELS:
        raise ExportError(f"unknown model {model!r} to export; expected one of {', '.join(MODELS)}")
    run_dir = Path(run_dir)
    read_run_config(run_dir)  # a missing or foreign directory is named before anything else
    if not (run_dir / "members.json").is_file():
        raise RunDirError(f"{run_dir} has no members.json: the run has not finished (evo-subens resume {run_dir})")
    if model == "student":
        from .distillation import STUDENT_FILE

        if not (run_dir / STUDENT_FILE).is_file():
            raise RunDirError(f"{run_dir / STUDENT_FILE} does not exist: the run has no student yet "
                              f"(evo-subens distill {run_dir})")
    if fmt == "onnx":
        _require_onnx()
    path = _output_path(Path(out) if out is not None else run_dir / "export" / f"{model}{FORMATS[fmt]}")
    if model == "student":
        from .distillation import load_student

        ensemble = load_student(run_dir)
    else:
        ensemble = load_ensemble(run_dir)
    form = write_ensemble(ensemble, fmt, path)
    # How members run ("in a loop") says nothing of one student.
    what = "the distilled student" if model == "student" else f"{ensemble.num_members} members{form}"
    progress(f"[export] wrote {path} ({fmt}, {what}, {_size(path.stat().st_size)})")
    return path


def write_ensemble(ensemble: Ensemble, fmt: str, path: str | Path) -> str:
    """Write ``ensemble`` (put in eval mode) as ``fmt`` to ``path`` atomically; returns how the members run
    in the file (``", vectorised"``, ``", in a loop"``, or ``""`` for weights only)."""
    writers = {"torchscript": _torchscript, "pt2": _pt2, "onnx": _onnx, "safetensors": _safetensors}
    if fmt not in writers:
        raise ExportError(f"unknown export format {fmt!r}; expected one of {', '.join(FORMATS)}")
    ensemble.eval()
    data, form = writers[fmt](ensemble)
    try:
        atomic_write(Path(path), lambda handle: handle.write(data))
    except OSError as exc:
        raise ExportError(f"cannot write {path}: {exc.strerror or exc}") from None
    return form


def description(ensemble: Ensemble) -> dict[str, Any]:
    """What a user needs to use an exported ensemble without evo_subens: the architecture the members were
    built with (``model``: the registry ``name`` or the user's ``architecture``, whichever was used, and
    ``kwargs``), the input (shape, the form in words, feature columns, image form), classes, input transform,
    number of members, how they combine."""
    model = None
    if ensemble.config is not None:
        cfg = ensemble.config.model
        # model.name is not used where an architecture is given: recorded, it would name a model never built.
        built = {"architecture": cfg.architecture} if cfg.architecture else {"name": cfg.name}
        model = dict(built, kwargs=dict(cfg.kwargs or {}))
    return {"format_version": FORMAT_VERSION, "producer": f"evo_subens {__version__}", "model": model,
            "input_shape": list(ensemble.input_shape), "input": ensemble.expected_input("a float32 batch"),
            "features": ensemble.features,
            "image": ensemble.image.to_dict() if ensemble.image is not None else None,
            "num_classes": ensemble.num_classes, "classes": ensemble.classes,
            "transform": ensemble.transform.to_dict(), "members": ensemble.num_members,
            "packed": ensemble.packed.layout if isinstance(ensemble, PackedRunEnsemble) else None,
            "output": "mean of the members' softmax probabilities; model input = (raw / scale - mean) / std"}


# ------------------------------------------------------------------------------------------------ checks

def _require_onnx() -> None:
    missing = []
    for package in ("onnx", "onnxscript"):
        try:
            __import__(package)
        except ImportError:
            missing.append(package)
    if missing:
        raise ExportError(f"the onnx format needs the package(s) {', '.join(missing)}: pip install -e '.[export]'")


def _output_path(path: Path) -> Path:
    """``path`` once its folder exists and it can be written there (checked before the slow part)."""
    if path.is_dir():
        raise ExportError(f"cannot write {path}: it is a directory; give a file path")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ExportError(f"cannot write {path}: its folder cannot be created ({exc.strerror or exc})") from None
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise ExportError(f"cannot write {path}: {path.parent} is not writable")
    return path


def _size(count: int) -> str:
    for unit in ("bytes", "kB", "MB"):
        if count < 1000 or unit == "MB":
            return f"{count:,} {unit}" if unit == "bytes" else f"{count:.1f} {unit}"
        count /= 1000
    return ""


# ------------------------------------------------------------------------------------ the graph formats

class _Vectorised(nn.Module):
    """The ensemble's forward with the members under vmap."""

    def __init__(self, ensemble: Ensemble):
        super().__init__()
        self.ensemble = ensemble

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ensemble.vmapped_probs(self.ensemble.transform(x)).mean(dim=0)


class _Looped(nn.Module):
    """The ensemble's forward as plain member modules run one after another: the form every graph capture
    takes (``torch.jit.trace`` refuses ``functional_call``, which the stacked forms need)."""

    def __init__(self, ensemble: Ensemble):
        super().__init__()
        self.transform = ensemble.transform
        self.members = nn.ModuleList(ensemble.members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.transform(x)
        total = self.members[0](x).softmax(dim=-1)
        for member in self.members[1:]:
            total = total + member(x).softmax(dim=-1)
        return total / len(self.members)


class _Packed(nn.Module):
    """A packed run's forward: its members side by side in one network of grouped layers."""

    def __init__(self, ensemble: PackedRunEnsemble):
        super().__init__()
        self.transform = ensemble.transform
        self.packed = ensemble.packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.packed(self.transform(x))


def _graph_forms(ensemble: Ensemble) -> list[tuple[nn.Module, str]]:
    """The modules a graph format may capture, best first, each with how its members run."""
    if isinstance(ensemble, PackedRunEnsemble):
        return [(_Packed(ensemble), ", packed")]
    forms = [(_Vectorised(ensemble), ", vectorised")] if ensemble.vectorise else []
    return forms + [(_Looped(ensemble), ", in a loop")]


class _ShapeChecked(nn.Module):
    """A traced graph behind a shape check (scripted): tracing fixes the sample shape without checking it,
    and an architecture with adaptive pooling would otherwise answer inputs of another size silently."""

    def __init__(self, inner: nn.Module, input_shape: tuple[int, ...], expected: str):
        super().__init__()
        self.inner = inner
        self.input_shape = list(input_shape)
        self.expected = expected

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != len(self.input_shape) + 1 or x.shape[1:] != self.input_shape:
            raise ValueError("expected " + self.expected + ", got a tensor of shape " + str(x.shape))
        return self.inner(x)


def _example(ensemble: Ensemble) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.rand((EXAMPLE_BATCH, *ensemble.input_shape), generator=generator)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporters' chatter (deprecation notes, per-step log lines) while they run."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "torch._export")]
    levels = [logger.level for logger in loggers]
    try:
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=DeprecationWarning)
            warnings.simplefilter("ignore", category=FutureWarning)
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _failure(fmt: str, exc: BaseException) -> ExportError:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return ExportError(f"the {fmt} exporter cannot capture this ensemble's architecture "
                       f"({type(exc).__name__}: {first}); the safetensors format holds its weights whatever it is")


def _torchscript(ensemble: Ensemble) -> tuple[bytes, str]:
    module, form = _graph_forms(ensemble)[-1]  # torch.jit.trace refuses functional_call: not the vmapped form
    try:
        with _quiet():
            traced = torch.jit.trace(module.eval(), _example(ensemble))
            checked = torch.jit.script(_ShapeChecked(traced, ensemble.input_shape, ensemble.expected_input()))
    except Exception as exc:
        raise _failure("torchscript", exc) from exc
    buffer = io.BytesIO()
    torch.jit.save(checked, buffer, _extra_files={DESCRIPTION_NAME: json.dumps(description(ensemble))})
    return buffer.getvalue(), form


def _programs(ensemble: Ensemble) -> Iterator[tuple[torch.export.ExportedProgram, str]]:
    """The ensemble captured by ``torch.export`` with a dynamic batch size: vectorised first; where that
    capture fails (vmapped convolutions fix the batch size, for one) the looped form. Lazily, so a caller
    that can use the first never pays for the second."""
    batch = {0: torch.export.Dim("batch")}
    error: Exception | None = None
    for module, form in _graph_forms(ensemble):
        try:
            with _quiet():
                program = torch.export.export(module.eval(), (_example(ensemble),), dynamic_shapes=(batch,))
        except Exception as exc:
            error = exc
            continue
        yield program, form
    if error is not None:
        raise _failure("torch.export", error) from error


def _pt2(ensemble: Ensemble) -> tuple[bytes, str]:
    program, form = next(_programs(ensemble))
    buffer = io.BytesIO()
    torch.export.save(program, buffer, extra_files={DESCRIPTION_NAME: json.dumps(description(ensemble))})
    return buffer.getvalue(), form


def _onnx(ensemble: Ensemble) -> tuple[bytes, str]:
    _require_onnx()
    error: Exception | None = None
    for program, form in _programs(ensemble):
        try:
            with _quiet():
                onnx_program = torch.onnx.export(program, (_example(ensemble),), dynamo=True, verbose=False,
                                                 input_names=["x"], output_names=["probs"])
        except Exception as exc:  # an operator of this form has no ONNX translation: try the next form
            error = exc
            continue
        proto = onnx_program.model_proto
        _name_batch_dimension(proto)
        entry = proto.metadata_props.add()
        entry.key, entry.value = METADATA_KEY, json.dumps(description(ensemble))
        return proto.SerializeToString(), form
    raise _failure("onnx", error) from error


def _name_batch_dimension(proto: Any) -> None:
    """Call the dynamic batch dimension ``batch`` instead of the exporter's symbol (``s77``), so that
    ONNX tools show what it is."""
    graph = proto.graph
    symbol = graph.input[0].type.tensor_type.shape.dim[0].dim_param
    if not symbol:
        return
    for value in [*graph.input, *graph.output, *graph.value_info]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param == symbol:
                dim.dim_param = "batch"


def _safetensors(ensemble: Ensemble) -> tuple[bytes, str]:
    from safetensors.torch import save

    tensors = {}
    if isinstance(ensemble, PackedRunEnsemble):  # one network: its own weights, laid out as description's packed
        for name, value in ensemble.packed.state_dict().items():
            tensors[f"packed.{name}"] = value.detach().cpu().contiguous().clone()
        return save(tensors, metadata={METADATA_KEY: json.dumps(description(ensemble))}), ", packed"
    for i, member in enumerate(ensemble.members):
        for name, value in member.state_dict().items():
            # Own contiguous CPU copies: safetensors refuses tensors that share memory (tied weights).
            tensors[f"member.{i}.{name}"] = value.detach().cpu().contiguous().clone()
    return save(tensors, metadata={METADATA_KEY: json.dumps(description(ensemble))}), ""
