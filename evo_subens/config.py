"""Run configuration: typed dataclasses loaded from YAML, with dotted ``key=value`` overrides.

Every field carries a one-line doc (``evo-subens config`` prints them) and its constraints, so a
bad value is rejected before any work starts with a message that names the field::

    >>> cfg = load_config("configs/default.yaml", ["search.population=64"])
    >>> cfg.search.population
    64
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError, ConfigFileError


def option(default: Any, doc: str, *, choices: tuple | None = None, ge: float | None = None,
           gt: float | None = None, le: float | None = None) -> Any:
    """A dataclass field with a doc string and range/choice constraints checked on load."""
    meta = {"doc": doc, "choices": choices, "ge": ge, "gt": gt, "le": le}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class DataConfig:
    name: str = option("mnist1d", "dataset registry key", choices=("mnist1d", "digits", "fashion-mnist"))
    root: str | None = option(None, "folder with the dataset's files (fashion-mnist: the IDX .gz files); "
                                    "null = the dataset's default location")
    seed: int = option(0, "seed of data generation (mnist1d) and of the train/validation/test split", ge=0)
    validation_size: float = option(0.2, "validation split carved from the training pool: a fraction "
                                         "(0 < v < 1) or a number of samples (>= 1)", gt=0)
    num_samples: int | None = option(None, "mnist1d: samples generated (default 5000, 80% training pool, "
                                           "20% test); other datasets: cap on the training pool", ge=10)


@dataclass
class ModelConfig:
    name: str = option("cnn1d", "architecture registry key (mlp, cnn1d, cnn2d, lenet); ignored when "
                                "'architecture' is set")
    kwargs: dict = option({}, "keyword arguments for the architecture's constructor")
    architecture: str | None = option(None, "importable 'module:Class' used instead of the registry; built "
                                            "as Class(**kwargs)")
    parent_path: str | None = option(None, "state_dict file of a trained parent; null = train one")


@dataclass
class TrainConfig:
    epochs: int = option(10, "passes over the training split", ge=0)
    batch_size: int = option(128, "minibatch size", ge=1)
    lr: float = option(0.1, "peak learning rate", gt=0)
    lr_schedule: str = option("cosine", "learning-rate schedule, stepped per batch",
                              choices=("constant", "cosine", "onecycle", "step"))
    optimizer: str = option("sgd", "sgd (momentum, nesterov, weight_decay apply) or adam (weight_decay "
                                   "applies)", choices=("sgd", "adam"))
    momentum: float = option(0.9, "SGD momentum", ge=0, le=1)
    nesterov: bool = option(False, "Nesterov momentum")
    weight_decay: float = option(5e-4, "L2 weight decay", ge=0)


@dataclass
class FinetuneConfig(TrainConfig):
    epochs: int = option(0, "SGD epochs on each selected member before the ensemble is built; 0 = off", ge=0)
    lr: float = option(0.01, "peak learning rate", gt=0)


@dataclass
class TuneConfig(TrainConfig):
    epochs: int = option(1, "epochs each sparse child is tuned (mask fixed) before it is scored", ge=0)
    lr: float = option(0.1, "peak learning rate", gt=0)
    lr_schedule: str = option("onecycle", "constant, or onecycle: warm-up over 10% from lr/100 to lr, then "
                                          "cosine to ~1e-7 lr (Prune and Tune)",
                              choices=("constant", "cosine", "onecycle", "step"))
    bagging: bool = option(False, "each child tunes on its own random 90% of the training split")


@dataclass
class ChildrenConfig:
    family: str = option("noisy", "how children are derived from a parent: noisy (Gaussian mutations) or "
                                  "sparse (pruning masks, tuned)", choices=("noisy", "sparse"))
    density: float = option(0.05, "fraction of the eligible parameters each mutation perturbs "
                                  "(1.0 = dense noise)", gt=0, le=1)
    sigma: float = option(0.1, "noise standard deviation (absolute, or a multiple of each layer's "
                               "weight std when sigma_mode is relative)", ge=0)
    sigma_mode: str = option("relative", "scale of sigma", choices=("absolute", "relative"))
    subspace: str = option("dynamic", "static: one mask per generation; dynamic: a fresh mask per child",
                           choices=("static", "dynamic"))
    layers: list = option(["*"], "glob patterns over parameter names (e.g. 'features.*', '*.weight') "
                                 "selecting the eligible parameters")
    include_classifier: bool = option(True, "noisy: whether the final classifier layer may be perturbed "
                                            "(sparse never prunes it)")
    mask: str = option("random", "sparse: random masks, antirandom pairs (M, 1-M at sparsity 0.5), or "
                                 "partition (each generation's children share out the parent)",
                       choices=("random", "antirandom", "partition"))
    sparsity: float = option(0.5, "sparse (random): fraction of the prunable units removed; partition: "
                                  "derived as 1 - partition_overlap / search.population", ge=0, le=0.999)
    structure: str = option("connection", "sparse: prune single weights (connection) or whole output "
                                          "units of Linear/Conv layers (neuron)", choices=("connection", "neuron"))
    scope: str = option("global", "sparse: draw masks over all prunable units at once (global) or per "
                                  "layer at the same sparsity (layerwise)", choices=("global", "layerwise"))
    partition_overlap: int = option(1, "sparse partition: every prunable unit is kept by exactly this many "
                                       "of a generation's children", ge=1)
    tune: TuneConfig = field(default_factory=TuneConfig, metadata={"doc": "tuning of sparse children"})


@dataclass
class SearchConfig:
    population: int = option(16, "candidates evaluated per generation", ge=1)
    generations: int = option(3, "generations; generation 0 mutates the parent, later ones the elites", ge=1)
    elites: int = option(4, "best candidates kept as the parents of the next generation", ge=1)
    fitness: str = option("accuracy", "validation metric that ranks candidates; the other breaks ties",
                          choices=("accuracy", "nll"))
    eval_batch_size: int = option(1000, "batch size of validation/test forward passes", ge=1)


@dataclass
class WorkersConfig:
    executor: str = option("ray", "ray: evaluate in Ray actors; local: the same code in this process",
                           choices=("ray", "local"))
    num_actors: int | None = option(None, "evaluation actors; null = one per available CPU "
                                          "(divided by threads_per_actor)", ge=1)
    threads_per_actor: int = option(1, "torch threads used by each actor (and by the local executor)", ge=1)
    num_gpus_per_actor: float = option(0.0, "GPUs requested per actor; actors evaluate on CUDA when > 0 "
                                            "and a GPU is present", ge=0)
    address: str | None = option(None, "Ray cluster address; null = RAY_ADDRESS or a local Ray")
    subbatch_size: int | None = option(None, "candidates per actor task; null = balance over actors "
                                             "(about 2 tasks per actor per generation)", ge=1)


@dataclass
class EnsembleConfig:
    size: int = option(8, "members (topk: the best distinct candidates of the whole search; greedy: "
                          "picks, a candidate may be picked more than once)", ge=1)
    selection: str = option("topk", "topk: best validation fitness; greedy: forward selection with "
                                    "replacement minimising the validation ensemble's NLL (Caruana et al., "
                                    "2004)", choices=("topk", "greedy"))
    pool: int = option(0, "greedy: candidates it chooses from, the best by validation fitness; 0 = 4 x size",
                       ge=0)


@dataclass
class RunConfig:
    name: str | None = option(None, "run directory name under output_dir; null = '<config>-s<seed>-<time>'")
    seed: int = option(0, "seed of parent training and of the search", ge=0)
    output_dir: str = option("runs", "folder that holds run directories")
    data: DataConfig = field(default_factory=DataConfig, metadata={"doc": "dataset and splits"})
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"doc": "parent architecture"})
    parent: TrainConfig = field(default_factory=TrainConfig, metadata={"doc": "parent training (SGD)"})
    children: ChildrenConfig = field(default_factory=ChildrenConfig, metadata={"doc": "child family"})
    search: SearchConfig = field(default_factory=SearchConfig, metadata={"doc": "population loop"})
    workers: WorkersConfig = field(default_factory=WorkersConfig, metadata={"doc": "evaluation workers"})
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig, metadata={"doc": "member fine-tuning"})
    ensemble: EnsembleConfig = field(default_factory=EnsembleConfig, metadata={"doc": "ensemble selection"})

    def check(self) -> None:
        """Cross-field checks (single fields are checked while loading)."""
        kept = self.search.population * self.search.generations
        if self.ensemble.size > kept:
            raise ConfigError("ensemble.size", f"at most search.population * search.generations = {kept} "
                                               "(the candidates the search evaluates)", self.ensemble.size)
        if self.search.elites > self.search.population:
            raise ConfigError("search.elites", f"at most search.population = {self.search.population}",
                              self.search.elites)
        if self.model.architecture is not None and ":" not in self.model.architecture:
            raise ConfigError("model.architecture", "'module:Class'", self.model.architecture)
        if not self.children.layers or not all(isinstance(p, str) for p in self.children.layers):
            raise ConfigError("children.layers", "a non-empty list of glob patterns (strings)",
                              self.children.layers)
        children = self.children
        if children.family == "sparse" and children.mask == "antirandom":
            if children.sparsity != 0.5:
                raise ConfigError("children.sparsity", "0.5 for antirandom masks (M and 1 - M)", children.sparsity)
            if self.search.population % 2:
                raise ConfigError("search.population", "an even number for antirandom pairs",
                                  self.search.population)
        if children.family == "sparse" and children.mask == "partition" and \
                children.partition_overlap >= self.search.population:
            raise ConfigError("children.partition_overlap", f"less than search.population = "
                                                             f"{self.search.population}", children.partition_overlap)
        v = self.data.validation_size
        if v >= 1 and v != int(v):
            raise ConfigError("data.validation_size", "a fraction in (0, 1) or a whole number of samples", v)


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-3`` as a float (YAML 1.2); PyYAML's 1.1 rules make it a string."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def parse_yaml(text: str) -> Any:
    """Parse YAML text the way configs and overrides are read."""
    return yaml.load(text, Loader=_YamlLoader)


def _describe(hint: Any) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
             list: "a list", dict: "a mapping", type(None): "null"}
    args = typing.get_args(hint)
    if args:
        return " or ".join(_describe(a) for a in args)
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def _coerce(value: Any, hint: Any, path: str) -> Any:
    """Check ``value`` against a field's type hint; ints are accepted where floats are expected."""
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        for arg in args:
            try:
                return _coerce(value, arg, path)
            except ConfigError:
                continue
        raise ConfigError(path, _describe(hint), value)
    if hint is type(None):
        if value is None:
            return None
    elif hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint in (str, list, dict):
        if isinstance(value, hint):
            return value
    raise ConfigError(path, _describe(hint), value)


def _check_range(value: Any, meta: dict, path: str) -> None:
    if value is None:
        return
    if meta.get("choices") and value not in meta["choices"]:
        raise ConfigError(path, "one of " + ", ".join(repr(c) for c in meta["choices"]), value)
    bounds = [(meta.get("gt"), "> {}", lambda v, b: v > b), (meta.get("ge"), ">= {}", lambda v, b: v >= b),
              (meta.get("le"), "<= {}", lambda v, b: v <= b)]
    failed = [fmt.format(b) for b, fmt, ok in bounds if b is not None and not ok(value, b)]
    if failed:
        wanted = " and ".join(fmt.format(b) for b, fmt, _ in bounds if b is not None)
        raise ConfigError(path, f"a value {wanted}", value)


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(prefix or "<top level>", "a mapping of fields", data)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        path = f"{prefix}.{unknown[0]}" if prefix else str(unknown[0])
        raise ConfigError(path, "one of the known fields: " + ", ".join(fields), show_got=False)
    kwargs = {}
    for name, value in data.items():
        path = f"{prefix}.{name}" if prefix else name
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, path)
        else:
            value = _coerce(value, hint, path)
            _check_range(value, fields[name].metadata, path)
            kwargs[name] = value
    return cls(**kwargs)


def config_from_dict(data: dict) -> RunConfig:
    """Build and validate a :class:`RunConfig` from a nested mapping."""
    cfg = _build(RunConfig, data or {}, "")
    cfg.check()
    return cfg


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply dotted ``key=value`` overrides (values parsed as YAML) to a nested mapping, in place."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(item, "an override of the form section.field=value", show_got=False)
        try:
            value = parse_yaml(raw)
        except yaml.YAMLError:
            value = raw
        node = data
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(".".join(parts[: i + 1]), "a section", child)
            node = child
        node[parts[-1]] = value
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load a YAML config (or the defaults when ``path`` is None) and apply ``key=value`` overrides."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigFileError(f"config file {path} does not exist")
        try:
            data = parse_yaml(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigFileError(f"config file {path} is not valid YAML: {exc}") from None
    apply_overrides(data, overrides or [])
    return config_from_dict(data)


def config_to_dict(cfg: Any) -> dict:
    """The config as plain data (the resolved config written to each run directory)."""
    return dataclasses.asdict(cfg)


def field_docs(cls: type = RunConfig, prefix: str = "") -> list[tuple[str, str, Any]]:
    """(dotted name, doc, default) of every field, for ``evo-subens config``."""
    rows = []
    hints = typing.get_type_hints(cls)
    instance = cls()
    for f in dataclasses.fields(cls):
        path = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            rows.extend(field_docs(hints[f.name], path + "."))
        else:
            rows.append((path, f.metadata.get("doc", ""), getattr(instance, f.name)))
    return rows
