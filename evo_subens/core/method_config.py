"""The config sections of the methods other than the engine's own: matched-budget baselines and packed
partition ensembles (sections of :class:`~evo_subens.core.config.RunConfig`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .options import option
from .train_config import LR_SCHEDULES, TrainConfig

METHODS = ("subnetworks", "single", "deep_ensemble", "bagging", "mc_dropout", "snapshot", "fge")


@dataclass
class BaselineConfig:
    budget_epochs: int = option(0, "training epochs a baseline spends in all, summed over its models; 0 = "
                                   "the subnetwork method's budget under this config (parent.epochs + "
                                   "children.tune.epochs x candidates tuned + finetune.epochs x ensemble.size)",
                                ge=0)
    members: int = option(4, "deep_ensemble and bagging: models trained on an equal share of the budget; "
                             "snapshot and fge: snapshots, one per cycle", ge=1)
    bagging_share: float = option(0.9, "bagging: share of the training split each model draws, without "
                                       "replacement", gt=0, le=1)
    dropout: float = option(0.0, "mc_dropout: dropout probability given to the model as its 'dropout' "
                                 "keyword; 0 = the model's own (model.kwargs)", ge=0, le=0.99)
    mc_samples: int = option(16, "mc_dropout: stochastic test passes (dropout active) averaged; 0 = dropout off "
                                 "at test time (one deterministic pass)", ge=0)
    fge_cycle_epochs: int = option(2, "fge: epochs per cycle of the cyclic linear learning rate (even: a "
                                      "snapshot is taken at each mid-cycle minimum)", ge=2)
    fge_lr_max: float = option(0.05, "fge: learning rate at the start and end of each cycle", gt=0)
    fge_lr_min: float = option(0.0005, "fge: learning rate at mid-cycle, where the snapshot is taken", gt=0)


@dataclass
class PackedTuneConfig(TrainConfig):
    epochs: int = option(30, "epochs each packed candidate is tuned, all its members at once (one optimiser, "
                            "each member's loss its own)", ge=0)
    lr: float = option(0.05, "peak learning rate", gt=0)
    lr_schedule: str = option("onecycle", "learning-rate schedule, stepped per batch; onecycle: warm-up over "
                                          "10% from lr/100 to lr, then cosine to ~1e-7 lr", choices=LR_SCHEDULES)


@dataclass
class PackedConfig:
    members: int = option(4, "members cut from the parent: every hidden layer's units are shared out among "
                             "them (each width must divide evenly)", ge=2)
    overlap: int = option(1, "every hidden unit is kept by this many members (1: disjoint shares; more: wider, "
                             "overlapping members, each with its own copy of the shared units)", ge=1)
    candidates: int = option(4, "partitions cut, tuned and scored on the validation split; the one with the "
                                "lowest validation NLL is the ensemble", ge=1)
    tune: PackedTuneConfig = field(default_factory=PackedTuneConfig,
                                   metadata={"doc": "tuning of each packed candidate"})
