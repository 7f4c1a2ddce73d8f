"""SGD training settings: the parent's, the children's tuning and the members' fine-tuning (sections of
:class:`~evo_subens.core.config.RunConfig`)."""

from __future__ import annotations

from dataclasses import dataclass

from .options import option

# Learning-rate schedules a config may name (evo_subens.tasks.classification.training.lr_factor implements them).
LR_SCHEDULES = ("constant", "cosine", "onecycle", "step")
# Share of the training split a child tunes on with children.tune.bagging.
BAGGING_SHARE = 0.9


@dataclass
class TrainConfig:
    epochs: int = option(30, "passes over the training split", ge=0)
    batch_size: int = option(128, "minibatch size", ge=1)
    lr: float = option(0.05, "peak learning rate", gt=0)
    lr_schedule: str = option("cosine", "learning-rate schedule, stepped per batch",
                              choices=LR_SCHEDULES)
    optimizer: str = option("sgd", "sgd (momentum, nesterov, weight_decay apply) or adam (weight_decay "
                                   "applies)", choices=("sgd", "adam"))
    momentum: float = option(0.9, "SGD momentum", ge=0, le=1)
    nesterov: bool = option(False, "Nesterov momentum")
    weight_decay: float = option(5e-4, "L2 weight decay", ge=0)


@dataclass
class ParentConfig(TrainConfig):
    check_learned: bool = option(True, "stop the run before the search when the trained parent scores near "
                                       "chance on the selection split or its training loss never fell; false: "
                                       "say so and go on (the scikit-learn estimator's default, since "
                                       "scikit-learn fits any data)")


@dataclass
class FinetuneConfig(TrainConfig):
    epochs: int = option(2, "SGD epochs on each selected member (in the workers, in parallel) before the "
                            "ensemble is built: the 'optimise' of sample, perturb, optimise; 0 = off", ge=0)
    lr: float = option(0.05, "peak learning rate", gt=0)
    lr_schedule: str = option("onecycle", "learning-rate schedule, stepped per batch; onecycle: warm-up over "
                                          "10% from lr/100 to lr, then cosine to ~1e-7 lr",
                              choices=LR_SCHEDULES)


@dataclass
class TuneConfig(TrainConfig):
    epochs: int = option(1, "epochs each child is tuned before it is scored", ge=0)
    lr: float = option(0.1, "peak learning rate", gt=0)
    lr_schedule: str = option("onecycle", "constant, or onecycle: warm-up over 10% from lr/100 to lr, then "
                                          "cosine to ~1e-7 lr (Prune and Tune)",
                              choices=LR_SCHEDULES)
    bagging: bool = option(False, "each child tunes on its own random 90% of the training split")
