"""Run configuration: typed dataclasses loaded from YAML, with dotted ``key=value`` overrides.

Every field carries a one-line doc (``evo-subens config`` prints them) and its constraints, so a
bad value is rejected before any work starts with a message that names the field::

    >>> cfg = load_config("configs/default.yaml", ["search.population=64"])
    >>> cfg.search.population
    64
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError, ConfigFileError
from ..tasks import TASKS
from ..tasks.classification.config import DataConfig
from ..tasks.rl.config import EnvConfig, PolicyConfig, PPOConfig
from .options import build_section, option, parse_yaml
from .options import field_docs as section_field_docs
from .method_config import METHODS, BaselineConfig, PackedConfig, PackedTuneConfig  # noqa: F401 (re-exported)
from .train_config import (BAGGING_SHARE, LR_SCHEDULES, FinetuneConfig, ParentConfig,  # noqa: F401 (re-exported)
                           TrainConfig, TuneConfig)
from .tracking_config import TrackingConfig


@dataclass
class ModelConfig:
    name: str = option("cnn1d", "architecture registry key (mlp, cnn1d, cnn2d, lenet); ignored when "
                                "'architecture' is set")
    kwargs: dict = option({}, "keyword arguments for the architecture's constructor")
    architecture: str | None = option(None, "importable 'module:Class' used instead of the registry (the current "
                                            "folder is importable); built as Class(input_shape, num_classes, "
                                            "**kwargs), passing input_shape / num_classes only if its signature "
                                            "names them")
    parent_path: str | None = option(None, "weights of a trained parent (a state_dict saved with torch.save, or "
                                           "a .safetensors file); null = train one")


DEFAULT_FAMILY = "noisy"


def family_section(name: Any, path: str = "children") -> type[ChildrenConfig]:
    """The config section (a :class:`ChildrenConfig` subclass) of the registered child family ``name``;
    :class:`ConfigError` on ``<path>.family`` when no family has that name."""
    from ..families import family_class  # here, not at the top: the family modules import this one

    return family_class(name, field=f"{path}.family").config


@dataclass
class ChildrenConfig:
    """The ``children`` section: ``family`` names a registered child family, whose module declares a
    subclass of this one with the family's own fields, checks and docs. In YAML the section stays flat
    (``family`` plus that family's fields); ``ChildrenConfig(family=..., **fields)`` builds the family's
    subclass, so ``ChildrenConfig(density=0.1)`` is the default family's section."""

    family: str = option(DEFAULT_FAMILY, "how children are derived from a parent, one of the registered families")

    def __new__(cls, *args: Any, **kwargs: Any) -> ChildrenConfig:
        if cls is ChildrenConfig:
            cls = family_section(args[0] if args else kwargs.get("family", DEFAULT_FAMILY))
        return super().__new__(cls)

    @classmethod
    def select_section(cls, data: dict, path: str) -> type[ChildrenConfig]:
        """The section of ``data["family"]``; a field of another family is an error that names it."""
        family = data.get("family", DEFAULT_FAMILY)
        section = family_section(family, path)
        own = {f.name for f in dataclasses.fields(section)}
        for name in data:
            if name in own:
                continue
            owners = [label for label, other in cls.section_variants()
                      if name in {f.name for f in dataclasses.fields(other)}]
            if owners:
                kind = "family" if len(owners) == 1 else "families"
                raise ConfigError(f"{path}.{name}", f"a field of the {family} family ({path}.family is "
                                                    f"{family!r}); {name} belongs to the "
                                                    f"{' and '.join(owners)} {kind}", show_got=False)
        return section

    @classmethod
    def section_variants(cls) -> list[tuple[str, type[ChildrenConfig]]]:
        """(name, section) of every registered family."""
        from ..families import FAMILIES

        return [(name, family_section(name)) for name in FAMILIES]

    def check(self, run: RunConfig) -> None:
        """Checks across fields, including other sections of ``run`` (single fields are checked while
        loading). A family's section extends this with its own checks."""
        if type(self) is not family_section(self.family):
            raise ConfigError("children.family", f"the family of {type(self).__name__}", self.family)

    def tuning(self) -> TuneConfig | None:
        """How each child is trained before it is scored (families that train children); None: not at all.
        The run's cost and the baselines' matched budget count these epochs."""
        return None


@dataclass
class SearchConfig:
    population: int = option(8, "candidates evaluated per generation", ge=1)
    generations: int = option(3, "generations; generation 0 mutates the parent, later ones the elites", ge=1)
    elites: int = option(4, "raw scoring: best candidates kept as the parents of the next generation (tuned "
                            "scoring keeps the ensemble's members instead)", ge=1)
    fitness: str = option("nll", "validation metric that ranks candidates, one of the task's (classification: "
                                      "accuracy or nll); the others break ties")
    eval_batch_size: int = option(1000, "batch size of validation/test forward passes", ge=1)
    racing: bool = option(False, "stop scoring a candidate, after any validation batch, once it provably cannot "
                                 "rank among the best max(elites, ensemble candidates) so far; it is logged "
                                 "with raced=true and NaN metrics. Elites and members are unchanged; pays "
                                 "when eval_batch_size is a fraction of the validation split")
    step_size: str = option("one_fifth", "noisy: how the sigma of new mutations changes between generations: "
                                         "constant; one_fifth (1/5 success rule: divided by step_factor when more "
                                         "than a fifth of a generation's children beat the genome they extend, "
                                         "else multiplied by it); decay (multiplied by step_factor every "
                                         "generation)", choices=("constant", "one_fifth", "decay"))
    step_factor: float = option(0.7, "noisy: the factor step_size applies to sigma", gt=0, le=1)
    patience: int = option(0, "stop the search once this many generations in a row have not improved the "
                              "best validation fitness (and say so); 0 = always run every generation", ge=0)
    scoring: str | None = option(None, "null: tuned for classification, raw for rl (tuned scoring is built "
                                       "for classification); raw: candidates are scored as perturbed, the best "
                                       "are fine-tuned after the search; tuned: every candidate is fine-tuned "
                                       "(the finetune section, one whole schedule; sparse and stochastic "
                                       "children: their own children.tune) in its worker before it is scored, "
                                       "its fitness is how much it lowers the validation NLL of the ensemble "
                                       "it would join, and the ensemble is the greedy choice among the parent "
                                       "and every tuned candidate (members are not tuned again)",
                                 choices=("raw", "tuned"))
    step_spread: float = option(0.5, "tuned scoring, noisy: each candidate's sigma is children.sigma x centre x "
                                     "exp(step_spread x N(0, 1)); the centre moves to the geometric mean of the "
                                     "ensemble members' scales after every generation; 0 = one sigma", ge=0)


# Resources Ray manages itself; an actor asks for CPUs and GPUs through their own fields.
RAY_BUILTIN_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")


@dataclass
class WorkersConfig:
    executor: str = option("ray", "ray: evaluate in Ray actors; local: the same code in this process",
                           choices=("ray", "local"))
    num_actors: int | None = option(None, "evaluation actors; null = one per available CPU "
                                          "(divided by threads_per_actor)", ge=1)
    threads_per_actor: int = option(1, "torch threads used by each actor (and by the local executor)", ge=1)
    driver_threads: int | None = option(None, "torch threads of the driver (parent training, tuning and scoring "
                                              "in this process, test metrics); null = the CPUs this process may "
                                              "use, resolved when the config is checked and recorded in "
                                              "config.yaml. Float results depend on it, so it comes from the "
                                              "config, never from OMP_NUM_THREADS (which ray job submit sets "
                                              "to 1)", ge=1)
    num_gpus_per_actor: float = option(0.0, "GPUs requested per actor; actors evaluate on CUDA when > 0 "
                                            "and a GPU is present", ge=0)
    address: str | None = option(None, "Ray cluster address (head node host:port, or 'auto'); null = "
                                       "RAY_ADDRESS or a local Ray; the --address flag sets it")
    subbatch_size: int | None = option(None, "candidates per actor task; null = balance over actors "
                                             "(about 2 tasks per actor per generation)", ge=1)
    resources: dict = option({}, "custom Ray resources each actor requests, e.g. {accelerator_x: 1}; nodes "
                                 "offer them with `ray start --resources`")
    stall_timeout: float = option(30.0, "seconds an actor may leave the driver's pings unanswered (a stopped or "
                                        "stuck process; a busy one answers) before it is ended, restarted by "
                                        "Ray and its unfinished work redone; 0 = never", ge=0)
    lost_nodes_wait: float = option(60.0, "seconds the run waits, once nodes are gone and the rest cannot hold "
                                          "every actor, for nodes to return (an autoscaler's replacements) "
                                          "before it stops with the resume command", gt=0)
    placement: str = option("none", "none: Ray's default scheduling; spread / pack: one placement group "
                                    "bundle per actor, spread over the cluster's nodes or packed onto few",
                            choices=("none", "spread", "pack"))
    autocast: str = option("off", "mixed precision of validation passes on the actors' device: bf16 or fp16 "
                                  "autocast (faster on GPUs; scores then differ slightly from fp32)",
                           choices=("off", "bf16", "fp16"))
    stack_candidates: int = option(1, "candidates an actor scores together, in one vectorised pass over the "
                                      "layers after the activation cache (torch.func.vmap over their stacked "
                                      "weights); 1 = one at a time. Scores agree with single passes to float "
                                      "rounding", ge=1)
    activation_cache_mb: float = option(1024.0, "per actor: memory for the parent's activations on the "
                                                "validation split at the first layer a mutation can touch, so "
                                                "candidates run only the layers after it; 0 = off (results "
                                                "are identical either way)", ge=0)

    def check(self) -> None:
        """Custom resources are positive amounts of named resources other than Ray's built-in ones; the
        driver's threads are resolved."""
        if self.driver_threads is None:
            self.driver_threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
                os.cpu_count() or 1)
        for name, amount in self.resources.items():
            if not isinstance(name, str) or name in RAY_BUILTIN_RESOURCES:
                raise ConfigError(f"workers.resources.{name}", "a custom resource name (CPUs and GPUs are "
                                                               "threads_per_actor and num_gpus_per_actor)",
                                  show_got=False)
            if isinstance(amount, bool) or not isinstance(amount, (int, float)) or not amount > 0:
                raise ConfigError(f"workers.resources.{name}", "a number > 0", amount)


@dataclass
class EnsembleConfig:
    size: int = option(8, "members (topk: the best distinct candidates of the whole search; greedy: "
                          "picks, a candidate may be picked more than once)", ge=1)
    selection: str = option("topk", "topk: best validation fitness; greedy: forward selection with "
                                    "replacement minimising the validation ensemble's NLL (Caruana et al., "
                                    "2004)", choices=("topk", "greedy"))
    pool: int = option(0, "greedy: candidates it chooses from, the best by validation fitness; 0 = 4 x size",
                       ge=0)
    acceptance: bool = option(True, "after fine-tuning, a selected member joins the ensemble only if it lowers "
                                     "the validation ensemble's NLL (members tried best first; the first always "
                                     "joins), and an ensemble whose validation NLL is above the parent's is "
                                     "replaced by the parent alone; false = every selected member joins")
    holdout: float = option(0.5, "share of the validation split held back from the search, selection and "
                                 "acceptance, to check the chosen ensemble (and each generation's best) against "
                                 "the parent on data no decision has seen; 0 = none", ge=0, le=0.9)
    rule: str = option("mean", "how members act together: mean (of their probabilities; classification's only "
                               "rule); rl also: vote (majority of their actions), gated (the parent acts unless "
                               "its normalised entropy exceeds gate_threshold, then the members vote)",
                       choices=("mean", "vote", "gated"))
    gate_threshold: float = option(0.975, "rl, rule gated: the parent's normalised action entropy above which "
                                          "the members vote", gt=0, le=1)


@dataclass
class RunConfig:
    name: str | None = option(None, "run directory name under output_dir; null = '<config>-s<seed>-<time>'")
    seed: int = option(0, "seed of parent training and of the search", ge=0)
    output_dir: str = option("runs", "folder that holds run directories")
    task: str = option("classification", "the kind of problem: what the data, the parent, a candidate's score and "
                                         "the final metrics are", choices=tuple(TASKS))
    data: DataConfig = field(default_factory=DataConfig, metadata={"doc": "dataset and splits"})
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"doc": "parent architecture"})
    parent: ParentConfig = field(default_factory=ParentConfig, metadata={"doc": "parent training (SGD)"})
    children: ChildrenConfig = field(default_factory=ChildrenConfig, metadata={"doc": "child family"})
    search: SearchConfig = field(default_factory=SearchConfig, metadata={"doc": "population loop"})
    workers: WorkersConfig = field(default_factory=WorkersConfig, metadata={"doc": "evaluation workers"})
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig, metadata={"doc": "member fine-tuning"})
    ensemble: EnsembleConfig = field(default_factory=EnsembleConfig, metadata={"doc": "ensemble selection"})
    env: EnvConfig = field(default_factory=EnvConfig, metadata={"doc": "rl: the environment and its episode seeds"})
    ppo: PPOConfig = field(default_factory=PPOConfig, metadata={"doc": "rl: PPO training of the parent policy"})
    policy: PolicyConfig = field(default_factory=PolicyConfig, metadata={"doc": "rl: the policy network"})
    method: str = option("subnetworks", "subnetworks: children of one parent (this engine); or a matched-budget "
                                        "baseline configured in 'baseline': single, deep_ensemble, bagging, "
                                        "mc_dropout, snapshot, fge; or packed: a packed partition ensemble cut "
                                        "from the parent (configured in 'packed')", choices=(*METHODS, "packed"))
    baseline: BaselineConfig = field(default_factory=BaselineConfig, metadata={"doc": "matched-budget baselines"})
    packed: PackedConfig = field(default_factory=PackedConfig,
                                 metadata={"doc": "packed partition ensembles (method packed)"})
    tracking: TrackingConfig = field(default_factory=TrackingConfig,
                                     metadata={"doc": "experiment tracking of a search: MLflow, TensorBoard"})

    def check(self) -> None:
        """Cross-field checks (single fields are checked while loading)."""
        self._check_baseline()
        self.workers.check()
        self.tracking.check()
        kept = self.search.population * self.search.generations
        if self.ensemble.size > kept:
            raise ConfigError("ensemble.size", f"at most search.population * search.generations = {kept} "
                                               "(the candidates the search evaluates)", self.ensemble.size)
        if self.search.scoring is None:
            self.search.scoring = "tuned" if self.task == "classification" else "raw"
        if self.search.scoring == "tuned":
            self._check_tuned_scoring()
        if self.search.elites > self.search.population and self.search.scoring == "raw":  # tuned: elites = members
            raise ConfigError("search.elites", f"at most search.population = {self.search.population}",
                              self.search.elites)
        if self.model.architecture is not None and ":" not in self.model.architecture:
            raise ConfigError("model.architecture", "'module:Class'", self.model.architecture)
        self.children.check(self)
        self.data.check()
        if self.task == "rl":
            self.env.check()
            self.policy.check()
        elif self.ensemble.rule != "mean":
            raise ConfigError("ensemble.rule", f"mean for the {self.task} task (vote and gated are rl rules)",
                              self.ensemble.rule)
        from ..tasks import task_metrics  # here, not at the top: a task's modules may import this one

        metrics = [m.name for m in task_metrics(self.task) if m.ranks]
        if self.search.fitness not in metrics:
            raise ConfigError("search.fitness", f"one of the {self.task} task's metrics: {', '.join(metrics)}",
                              self.search.fitness)
        v = self.data.validation_size
        if v >= 1 and v != int(v):
            raise ConfigError("data.validation_size", "a fraction in (0, 1) or a whole number of samples", v)

    def _check_tuned_scoring(self) -> None:
        """Tuned scoring fine-tunes candidates (with the finetune section, or the family's own tuning) and
        ranks them in the ensemble."""
        if self.children.tuning() is None and self.finetune.epochs < 1:
            raise ConfigError("finetune.epochs", "at least 1 with search.scoring=tuned (every candidate is "
                                                 "fine-tuned before it is scored)", self.finetune.epochs)
        if self.task != "classification":
            raise ConfigError("search.scoring", f"raw for the {self.task} task (tuned scoring is built for "
                                                "classification)", self.search.scoring)
        if self.search.racing:
            raise ConfigError("search.racing", "false with search.scoring=tuned (a tuned candidate is scored "
                                               "whole)", self.search.racing)

    def _check_baseline(self) -> None:
        """The baseline methods' budget must cover their models, cycles and snapshots."""
        if self.method in ("subnetworks", "packed"):
            if self.packed.overlap >= self.packed.members:
                raise ConfigError("packed.overlap", f"less than packed.members = {self.packed.members}",
                                  self.packed.overlap)
            return
        base = self.baseline
        if self.model.parent_path is not None:
            raise ConfigError("model.parent_path", f"null for method {self.method} (baselines train their "
                                                   "own models)", self.model.parent_path)
        budget = baseline_budget(self)
        if budget < 1:
            raise ConfigError("baseline.budget_epochs", "at least 1 epoch (this config's matched budget is 0)",
                              base.budget_epochs)
        if self.method in ("deep_ensemble", "bagging", "snapshot") and base.members > budget:
            raise ConfigError("baseline.members", f"at most the budget of {budget} epochs (each model or "
                                                  "cycle trains at least one)", base.members)
        if self.method == "fge":
            cycle = base.fge_cycle_epochs
            if cycle % 2:
                raise ConfigError("baseline.fge_cycle_epochs", "an even number (snapshots at mid-cycle)", cycle)
            if base.fge_lr_min > base.fge_lr_max:
                raise ConfigError("baseline.fge_lr_min", f"at most baseline.fge_lr_max = {base.fge_lr_max}",
                                  base.fge_lr_min)
            most = (budget - 1 + cycle // 2) // cycle
            if base.members > most:
                raise ConfigError("baseline.members", f"at most {most} for fge in {budget} epochs (at least 1 "
                                                      f"epoch of pretraining, then {cycle} per snapshot)",
                                  base.members)


def config_from_dict(data: dict) -> RunConfig:
    """Build and validate a :class:`RunConfig` from a nested mapping."""
    cfg = build_section(RunConfig, data or {})
    cfg.check()
    return cfg


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply dotted ``key=value`` overrides (values parsed as YAML) to a nested mapping, in place."""
    if overrides and not isinstance(data, dict):
        raise ConfigError("<top level>", "a mapping of sections to apply overrides to", data)
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
    return config_from_dict(read_config_dict(path, overrides))


def read_config_dict(path: str | Path | None = None, overrides: list[str] | None = None) -> dict:
    """The sections a YAML config file holds (none when ``path`` is None), ``key=value`` overrides applied:
    what :func:`load_config` validates, before any default is filled in."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if path.is_dir():
            raise ConfigFileError(f"config file {path} is a directory; expected a YAML file such as "
                                  f"configs/default.yaml")
        if not path.is_file():
            what = "is not a regular file" if path.exists() else "does not exist"
            raise ConfigFileError(f"config file {path} {what}; expected a YAML file such as configs/default.yaml")
        try:
            data = parse_yaml(path.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError as exc:
            raise ConfigFileError(f"config file {path} is not a text (UTF-8) file: byte {exc.start} cannot be "
                                  f"decoded; expected YAML") from None
        except yaml.YAMLError as exc:
            raise ConfigFileError(f"config file {path} is not valid YAML: {exc}") from None
        except OSError as exc:
            raise ConfigFileError(f"config file {path} cannot be read: {exc.strerror or exc}") from None
        if not isinstance(data, dict):
            kind = {list: "a list", str: "a string", int: "a number", float: "a number", bool: "a boolean"}
            raise ConfigFileError(f"config file {path} holds {kind.get(type(data), type(data).__name__)}; "
                                  f"expected a mapping of sections (e.g. 'search: {{population: 16}}')")
    apply_overrides(data, overrides or [])
    return data


def config_to_dict(cfg: Any) -> dict:
    """The config as plain data (the resolved config written to each run directory)."""
    return dataclasses.asdict(cfg)


def field_docs(cls: type = RunConfig, prefix: str = "") -> list[tuple[str, str, Any]]:
    """(dotted name, doc, default) of every field, for ``evo-subens config --fields``: every family's
    fields, each doc prefixed with its family (``[sparse] ...``)."""
    return section_field_docs(cls, prefix)


def tune_epochs(cfg: RunConfig) -> int:
    """Epochs each child is tuned before it is scored (0: children are not trained)."""
    tune = cfg.children.tuning()
    return tune.epochs if tune is not None else 0


def candidate_tune_epochs(cfg: RunConfig) -> int:
    """Under tuned scoring, the epochs each candidate is tuned before it is scored: its family's own
    tuning (children.tune) where it has one, else the finetune section's."""
    return tune_epochs(cfg) if cfg.children.tuning() is not None else cfg.finetune.epochs


def subnetwork_budget_epochs(cfg: RunConfig) -> int:
    """Training epochs of the subnetwork method under ``cfg``: parent, tuned children, fine-tuned members."""
    candidates = cfg.search.population * cfg.search.generations
    parent = 0 if cfg.model.parent_path else cfg.parent.epochs
    if cfg.search.scoring == "tuned":  # every candidate tuned once (its family's tuning, else the finetune
        return parent + candidate_tune_epochs(cfg) * candidates  # section); members are not tuned again
    return parent + tune_epochs(cfg) * candidates + cfg.finetune.epochs * cfg.ensemble.size


def baseline_budget(cfg: RunConfig) -> int:
    """Epochs a baseline may spend: ``baseline.budget_epochs``, or (0) the subnetwork method's budget under
    the same config."""
    return cfg.baseline.budget_epochs or subnetwork_budget_epochs(cfg)
