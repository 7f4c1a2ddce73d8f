"""Latency benchmark: the ways a finished run's ensemble can be served, timed side by side against its parent.

For each batch size, in one process, on the same inputs, every form below answers a batch with class
probabilities (B, C):

``parent``
    The parent alone (its softmax): the reference every ratio is taken to.
``members looped``
    The members as separate models, one after another, their softmax averaged.
``members vmapped``
    The same members in one ``torch.func.vmap`` call over their stacked weights (``Ensemble.vmapped_probs``);
    an architecture vmap cannot run gets its error in the row instead of a time.
``packed``
    Packed runs only: the members as one network of grouped layers (:class:`~evo_subens.packed.PackedEnsemble`).
``student``
    Distilled runs only (``RUN_DIR/student/student.pt``): the one student model.

The input transform is applied once per batch size, before timing: every form is timed on the model's input.
The forms are measured interleaved: after warm-up calls, each round times every form once, in a freshly
shuffled order, so drift in the machine's load (it may be shared) reaches all forms alike; only the ratios of
one run's medians are meant to be compared (on a busy shared machine, ``threads=1`` also keeps torch's threads
from waiting on each other, which at two threads can stretch a 0.2 ms call to tens of ms). Reported per form
and batch: the median seconds per call, the interquartile range of the per-call times, the ratio of medians to
the parent's, the unique parameters and the FLOPs per sample (torch's counter: 2 per multiply-add). On
``device="cuda"`` every call is followed by ``torch.cuda.synchronize()``, so a time is a call's latency, not
its launch.

    >>> rows = latency_bench(["runs/packed-s0-20261203-163703"], batches=(1, 256))
    >>> [r["ratio"] for r in rows if r["form"] == "packed" and r["batch"] == 256]

or ``evo-subens bench latency runs/packed-s0-20261203-163703 --batches 1,256``.
"""

from __future__ import annotations

import gc
import platform
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..core.worker import torch_threads
from ..ensemble import Ensemble, PackedRunEnsemble, load_ensemble
from ..errors import RunDirError, UserError
from ..packed import count_flops

FORMS = ("parent", "members looped", "members vmapped", "packed", "student")
WARMUP_CALLS = 3
# Without a fixed count, rounds go on for about this many seconds per batch size, within these bounds.
SECONDS = 8.0
MIN_REPEATS, MAX_REPEATS = 15, 5000
SEED = 0


@dataclass
class Form:
    """One way of serving the ensemble: ``call`` maps a model-form batch to probabilities (B, C)."""

    name: str
    call: Callable[[torch.Tensor], torch.Tensor]
    params: int
    transform: nn.Module  # the raw-to-model-form transform of this form's model (the student has its own)
    error: str | None = None  # why it cannot run (set at warm-up); its row then holds no numbers


# ------------------------------------------------------------------------------------------------ the forms

def unique_parameters(modules: Sequence[nn.Module]) -> int:
    """Parameters of ``modules`` counted once each, however often they are shared or tied."""
    seen = {id(p): p.numel() for module in modules for p in module.parameters()}
    return sum(seen.values())


def _softmax_of(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda x: model(x).softmax(dim=-1)


def _looped(members: Sequence[nn.Module]) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda x: torch.stack([m(x).softmax(dim=-1) for m in members]).mean(dim=0)


def _student(run_dir: Path) -> Ensemble | None:
    """The run's distilled student (a one-member Ensemble), None where it has none."""
    from ..distillation import STUDENT_FILE, load_student

    return load_student(run_dir) if (run_dir / STUDENT_FILE).is_file() else None


def build_forms(ens: Ensemble, student: Ensemble | None, device: torch.device) -> list[Form]:
    """The forms this run's ensemble can be served in, their models on ``device`` in eval mode."""
    if ens.parent is None:
        raise RunDirError("the run has no parent.pt: the latency benchmark measures every form against the parent")
    parent = ens.parent.to(device).eval()
    members = [m.to(device).eval() for m in ens.members]
    # A fresh stack of the members: a packed run's ensemble keeps none, and an ordinary one's would carry the
    # transform to the device with it.
    stacked = Ensemble(members, input_shape=ens.input_shape, num_classes=ens.num_classes).to(device).eval()
    forms = [Form("parent", _softmax_of(parent), unique_parameters([parent]), ens.transform),
             Form("members looped", _looped(members), unique_parameters(members), ens.transform),
             Form("members vmapped", lambda x: stacked.vmapped_probs(x).mean(dim=0), unique_parameters([stacked]),
                  ens.transform)]
    if isinstance(ens, PackedRunEnsemble):
        packed = ens.packed.to(device).eval()
        forms.append(Form("packed", packed, unique_parameters([packed]), ens.transform))
    if student is not None:
        model = student.members[0].to(device).eval()
        forms.append(Form("student", _softmax_of(model), unique_parameters([model]), student.transform))
    return forms


# ---------------------------------------------------------------------------------------------- measuring

def _synchroniser(device: torch.device) -> Callable[[], None]:
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def _inputs(forms: Sequence[Form], input_shape: Sequence[int], batch: int, device: torch.device
            ) -> dict[str, torch.Tensor]:
    """Each form's model-form input for one batch: one raw batch (fixed seed), each transform applied once."""
    raw = torch.randn(batch, *input_shape, generator=torch.Generator().manual_seed(SEED))
    by_transform: dict[int, torch.Tensor] = {}
    for form in forms:
        if id(form.transform) not in by_transform:
            by_transform[id(form.transform)] = form.transform(raw).to(device)
    return {form.name: by_transform[id(form.transform)] for form in forms}


def _warm_up(forms: Sequence[Form], inputs: dict[str, torch.Tensor], sync: Callable[[], None]) -> None:
    """A few calls of every form (allocators, kernel choices, lazy init); a vmapped form that fails is marked."""
    for form in forms:
        try:
            for _ in range(WARMUP_CALLS):
                form.call(inputs[form.name])
            sync()
        except Exception as exc:
            if form.name != "members vmapped":
                raise
            form.error = f"vmap cannot run this architecture ({type(exc).__name__}: {str(exc).splitlines()[0]})"


def _rounds(forms: Sequence[Form], inputs: dict[str, torch.Tensor], repeats: int | None, seconds: float,
            sync: Callable[[], None], order_rng: random.Random) -> dict[str, list[float]]:
    """Rounds, each timing every form once in a shuffled order: seconds per call, by form. ``repeats`` rounds,
    or (None) as many as fill ``seconds`` of wall time, at least ``MIN_REPEATS`` and at most ``MAX_REPEATS``:
    a budget in time, not in rounds estimated beforehand, holds when the machine's load changes meanwhile."""
    times: dict[str, list[float]] = {form.name: [] for form in forms}
    order = list(forms)
    deadline = time.perf_counter() + seconds
    done = 0
    while (done < repeats if repeats is not None
           else done < MIN_REPEATS or (done < MAX_REPEATS and time.perf_counter() < deadline)):
        order_rng.shuffle(order)
        for form in order:
            x = inputs[form.name]
            sync()
            started = time.perf_counter()
            form.call(x)
            sync()
            times[form.name].append(time.perf_counter() - started)
        done += 1
    return times


def _quartiles(values: Sequence[float]) -> tuple[float, float, float]:
    if len(values) == 1:  # statistics.quantiles wants two points before Python 3.13
        return values[0], values[0], values[0]
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, median, q3


def _flops_per_sample(form: Form, x: torch.Tensor) -> float:
    return count_flops(form.call, x) / len(x)


def measure_batch(forms: Sequence[Form], input_shape: Sequence[int], batch: int, *, repeats: int | None,
                  seconds: float, device: torch.device) -> list[dict]:
    """One row per form at batch size ``batch`` (see :func:`latency_rows`)."""
    sync = _synchroniser(device)
    inputs = _inputs(forms, input_shape, batch, device)
    _warm_up(forms, inputs, sync)
    timed = [form for form in forms if form.error is None]
    # A collection pause landing in one form's call would be charged to that form alone.
    collecting = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        times = _rounds(timed, inputs, repeats, seconds, sync, random.Random(SEED + batch))
    finally:
        if collecting:
            gc.enable()
    count = len(times[timed[0].name])
    rows = []
    for form in forms:
        row = {"form": form.name, "batch": batch, "repeats": count, "params": form.params,
               "median_s": None, "q1_s": None, "q3_s": None, "iqr_s": None, "ratio": None, "flops_per_sample": None,
               "error": form.error}
        if form.error is None:
            q1, median, q3 = _quartiles(times[form.name])
            row.update(median_s=median, q1_s=q1, q3_s=q3, iqr_s=q3 - q1,
                       flops_per_sample=_flops_per_sample(form, inputs[form.name]))
        rows.append(row)
    parent = rows[0]["median_s"]
    for row in rows:
        if row["median_s"] is not None:
            row["ratio"] = row["median_s"] / parent
    return rows


def _device(name: str) -> torch.device:
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: this torch sees no CUDA device (a CPU-only build, or no GPU here); "
                        "use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name}: expected cpu or cuda")
    return device


def latency_rows(run_dir: str | Path, *, batches: Sequence[int] = (1, 256), repeats: int | None = None,
                 threads: int | None = None, device: str = "cpu", seconds: float = SECONDS) -> list[dict]:
    """Rows of the benchmark for one run: for each batch size, one per form (``FORMS`` order, forms the run
    lacks left out) with ``form``, ``batch``, ``median_s``, ``q1_s``/``q3_s``/``iqr_s`` (quartiles of the
    per-call times), ``ratio`` (median over the parent's), ``params``, ``flops_per_sample``, ``repeats`` and
    ``error`` (a form that could not run: its numbers are None).

    ``repeats``: rounds per batch size; None picks them to fill about ``seconds`` per batch size. ``threads``:
    torch intra-op threads while measuring (None: as they are)."""
    run_dir = Path(run_dir)
    _check_options(batches, repeats, threads, device)
    return _measure_run(load_ensemble(run_dir), _student(run_dir), batches=batches, repeats=repeats,
                        threads=threads, device=device, seconds=seconds)


def _check_options(batches: Sequence[int], repeats: int | None, threads: int | None, device: str) -> None:
    if not batches or any(int(b) < 1 for b in batches):
        raise UserError(f"batch sizes must be positive integers, got {list(batches)}")
    if repeats is not None and repeats < 1:
        raise UserError(f"--repeats must be at least 1, got {repeats}")
    if threads is not None and threads < 1:
        raise UserError(f"--threads must be at least 1, got {threads}")
    _device(device)


def _measure_run(ens: Ensemble, student: Ensemble | None, *, batches: Sequence[int], repeats: int | None,
                 threads: int | None, device: str, seconds: float) -> list[dict]:
    where = _device(device)
    forms = build_forms(ens, student, where)
    with torch_threads(threads if threads is not None else torch.get_num_threads()), torch.inference_mode():
        return [row for batch in batches
                for row in measure_batch(forms, ens.input_shape, int(batch), repeats=repeats, seconds=seconds,
                                         device=where)]


# ------------------------------------------------------------------------------------------------ printing

def device_line(device: str, threads: int | None) -> str:
    """The device, the torch threads and the torch version the numbers were taken with."""
    where = torch.device(device)
    if where.type == "cuda":
        name = f"cuda ({torch.cuda.get_device_name(where)}, CUDA {torch.version.cuda})"
    else:
        name = f"cpu ({_cpu_name()}, {torch.backends.cpu.get_cpu_capability()})"
    count = threads if threads is not None else torch.get_num_threads()
    return f"device {name}, torch threads {count}, torch {torch.__version__}"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _print_table(run_dir: Path, ens: Ensemble, rows: Sequence[dict], line: str) -> None:
    kind = "packed" if isinstance(ens, PackedRunEnsemble) else (ens.config.method if ens.config else "")
    rounds = ", ".join(f"{row['repeats']} at batch {row['batch']}" for row in rows if row["form"] == "parent")
    print(f"\n{run_dir}: {ens.num_members} members ({kind}), input {ens.input_shape}; {line}")
    print(f"medians of interleaved rounds, each form once per round in shuffled order ({rounds}); "
          f"spread = interquartile range (p25-p75) of the per-call times")
    print(f"{'form':<17}{'batch':>6}{'median ms':>11}{'spread ms':>11}{'x parent':>10}{'params':>11}"
          f"{'MFLOPs/sample':>15}")
    for row in rows:
        head = f"{row['form']:<17}{row['batch']:>6}"
        if row["error"] is not None:
            print(f"{head}  {row['error']}")
            continue
        print(f"{head}{row['median_s'] * 1e3:>11.4f}{row['iqr_s'] * 1e3:>11.4f}{row['ratio']:>10.2f}"
              f"{row['params']:>11,}{row['flops_per_sample'] / 1e6:>15.3f}")


def latency_bench(run_dirs: Sequence[str | Path], *, batches: Sequence[int] = (1, 256), repeats: int | None = None,
                  threads: int | None = None, device: str = "cpu", seconds: float = SECONDS) -> list[dict]:
    """Print one table per run and return all rows (:func:`latency_rows`'s, each with ``run``, the run
    directory as given)."""
    _check_options(batches, repeats, threads, device)
    # Every run is loaded before any is timed: a bad path fails at once, not after the earlier runs' minutes.
    loaded = [(Path(run_dir), load_ensemble(run_dir), _student(Path(run_dir))) for run_dir in run_dirs]
    line = device_line(device, threads)
    rows = []
    for run_dir, ens, student in loaded:
        run_rows = _measure_run(ens, student, batches=batches, repeats=repeats, threads=threads, device=device,
                                seconds=seconds)
        _print_table(run_dir, ens, run_rows, line)
        rows += [dict(row, run=str(run_dir)) for row in run_rows]
    return rows
