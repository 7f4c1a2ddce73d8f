"""Scoring candidates on the validation split: the code every worker runs, Ray actor or in-process.

A worker receives an :class:`EvaluationPayload` once (parent weights, validation data, family settings)
and then only genomes; it materialises each child in place on its copy of the parent, runs the
validation forward passes and restores the parent.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...core.config import ChildrenConfig, FinetuneConfig, ModelConfig
from .splits import Split
from .streaming import LazyInputs
from .metrics import VALIDATION_METRICS
from ...families import make_family
from .models import build_model, model_stages
from ...nn import state_copy
from .training import SplitTrainer, train
from ...core.worker import CandidateScore, Evaluator, RacingBound, WorkerPayload


@dataclass
class EvaluationPayload(WorkerPayload):
    """Everything a worker needs, shipped once per worker (through Ray's object store)."""

    metrics = VALIDATION_METRICS  # a class attribute: the same for every classification payload

    model: ModelConfig
    input_shape: tuple[int, ...]
    num_classes: int
    parent_state: dict[str, torch.Tensor]
    parent_id: str
    children: ChildrenConfig
    val_x: torch.Tensor | LazyInputs  # streamed data: compact (uint8 images) or memory-mapped, shared per node
    val_y: torch.Tensor
    batch_size: int
    threads: int
    use_gpu: bool = False
    # for families that train children (sparse tuning) and fine-tuning; streamed data: read from its files
    train_x: torch.Tensor | LazyInputs | None = None
    train_y: torch.Tensor | None = None
    augment: bool = False  # data.augment: training batches are randomly cropped and flipped
    finetune: FinetuneConfig | None = None  # SGD passes on selected members (see finetuned_state)
    activation_cache_mb: float = 0.0  # see WorkersConfig.activation_cache_mb
    autocast: str = "off"  # see WorkersConfig.autocast
    stack_candidates: int = 1  # see WorkersConfig.stack_candidates
    # search.scoring == "tuned" for a family that does not train its children: each candidate is fine-tuned
    # (the finetune section) before it is scored
    tune_candidates: bool = False

    def make_evaluator(self, device: str | torch.device = "cpu") -> "CandidateEvaluator":
        return CandidateEvaluator(self, device)


def tune_seed(genome: str) -> int:
    """The seed of a candidate's fine-tuning under tuned scoring: a function of its genome alone, so any
    worker (or a resumed run) tunes it to the same weights."""
    return int.from_bytes(hashlib.sha256(genome.encode()).digest()[:4], "little") >> 1


class CandidateEvaluator(Evaluator):
    """Holds the parent and the validation data on one device and scores genomes against them."""

    def __init__(self, payload: EvaluationPayload, device: str | torch.device = "cpu"):
        self.payload = payload
        self.device = torch.device(device)
        self.model = build_model(payload.model, payload.input_shape, payload.num_classes)
        self.model.load_state_dict(payload.parent_state)
        self.model.to(self.device).eval()
        self.family = make_family(payload.children)
        trainer = (SplitTrainer(Split(payload.train_x, payload.train_y), payload.augment)
                   if payload.train_x is not None else None)
        self.materialiser = self.family.bind(self.model, trainer)
        self.val_x = payload.val_x.to(self.device)
        self.val_y = payload.val_y.to(self.device)
        # Trained children are expensive to rebuild: keep the weights of those scored here until fetched.
        self._trained: dict[str, dict[str, torch.Tensor]] = {}
        self._cache: ActivationCache | None = None
        self._cache_checked = False
        self.racing_bound: RacingBound | None = None  # set by the search before each generation

    @property
    def activation_cache(self) -> "ActivationCache | None":
        """The parent's validation activations before the first mutable layer, built on first use (a
        driver that only rebuilds members never pays for it); None when caching is off or saves nothing."""
        if not self._cache_checked:
            self._cache_checked = True
            # A tuned candidate differs from the parent in every layer: nothing before it can be cached.
            mutated = None if self.payload.tune_candidates else self.family.mutated_parameters(self.model)
            if self.payload.activation_cache_mb > 0 and mutated is not None:
                with self._precision():  # cached layers run exactly as in a full pass
                    self._cache = ActivationCache.build(self.model, set(mutated), self.val_x,
                                                        self.payload.batch_size, self.payload.activation_cache_mb)
        return self._cache

    def _precision(self) -> contextlib.AbstractContextManager:
        """Autocast for validation passes when configured, on this evaluator's device type."""
        if self.payload.autocast == "off":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.payload.autocast == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def _check_parent(self, genome: str) -> None:
        if f'"parent":"{self.payload.parent_id}"' not in genome:
            raise ValueError(f"genome was derived from another parent (expected {self.payload.parent_id}): "
                             f"{genome[:200]}")

    @torch.inference_mode()
    def score_current(self, bound: RacingBound | None = None, model: torch.nn.Module | None = None
                      ) -> tuple[float, float] | None:
        """Validation (accuracy, NLL) of the model as it is now (the parent, outside ``evaluate``), or of
        ``model``; None when ``bound`` stopped it (checked after every batch)."""
        correct = 0
        loss = torch.zeros((), dtype=torch.float64, device=self.device)
        cache = self.activation_cache if model is None else None
        model = self.model if model is None else model
        n = len(self.val_y)
        for i, begin in enumerate(range(0, n, self.payload.batch_size)):
            y = self.val_y[begin:begin + self.payload.batch_size]
            with self._precision():
                if cache is not None:
                    logits = cache.forward(i)
                else:
                    logits = model(self.val_x[begin:begin + self.payload.batch_size])
            loss += F.cross_entropy(logits.float(), y, reduction="sum").double()
            correct += int((logits.argmax(dim=1) == y).sum())
            seen = begin + len(y)
            if bound is not None and seen < n and bound.hopeless(correct, loss.item(), seen, n):
                return None
        return correct / n, loss.item() / n

    def evaluate(self, genome: str) -> CandidateScore:
        """Validation accuracy and NLL of the child ``genome``."""
        started = time.perf_counter()
        self._check_parent(genome)
        if self.payload.tune_candidates:
            return self._evaluate_tuned(genome, started)
        with self.materialiser.materialised(genome):
            scores = self.score_current(self.racing_bound)
            if scores is None:
                return CandidateScore((math.nan, math.nan), time.perf_counter() - started, raced=True)
            if self.family.trains_children:
                self._trained[genome] = state_copy(self.model)
        return CandidateScore(tuple(scores), time.perf_counter() - started)

    def _evaluate_tuned(self, genome: str, started: float) -> CandidateScore:
        """Fine-tune the child (its own seed, from its genome), keep its weights until fetched, score the
        tuned model itself."""
        model = self._tuned_model(genome, tune_seed(genome))
        self._trained[genome] = state_copy(model)
        with self._precision():
            scores = self.score_current(model=model)
        return CandidateScore(tuple(scores), time.perf_counter() - started)

    def evaluate_many(self, genomes: list[str]) -> list[CandidateScore]:
        """Scores of ``genomes``: together in one vectorised pass per validation batch when stacking applies
        (``stack_candidates`` > 1, cached activations, no racing bound), else one by one."""
        cache = self.activation_cache
        if len(genomes) < 2 or self.payload.stack_candidates < 2 or cache is None or self.racing_bound is not None:
            return [self.evaluate(genome) for genome in genomes]
        started = time.perf_counter()
        for genome in genomes:
            self._check_parent(genome)
        scores = self._score_stacked(genomes, cache)
        seconds = (time.perf_counter() - started) / len(genomes)
        return [CandidateScore((accuracy, nll), seconds) for accuracy, nll in scores]

    @torch.inference_mode()
    def _score_stacked(self, genomes: list[str], cache: "ActivationCache") -> list[tuple[float, float]]:
        # Only the layers after the cache differ between candidates: stack each candidate's copy of them and
        # run all candidates at once with torch.func (one batched matmul per layer instead of one per
        # candidate).
        tail = torch.nn.Sequential(*cache.tail)
        names = [name for name, _ in tail.named_parameters()]
        copies = []
        for genome in genomes:
            with self.materialiser.materialised(genome):
                copies.append([p.detach().clone() for _, p in tail.named_parameters()])
        stacked = {name: torch.stack([c[i] for c in copies]) for i, name in enumerate(names)}
        run = torch.func.vmap(lambda params, x: torch.func.functional_call(tail, params, (x,)), in_dims=(0, None))
        count = len(genomes)
        correct = torch.zeros(count, dtype=torch.long, device=self.device)
        loss = torch.zeros(count, dtype=torch.float64, device=self.device)
        for i, begin in enumerate(range(0, len(self.val_y), self.payload.batch_size)):
            y = self.val_y[begin:begin + self.payload.batch_size]
            with self._precision():
                logits = run(stacked, cache.batches[i]).float()  # (candidates, batch, classes)
            loss += F.cross_entropy(logits.flatten(0, 1), y.repeat(count), reduction="none").view(count, -1).sum(1)
            correct += (logits.argmax(dim=2) == y).sum(dim=1)
        n = len(self.val_y)
        return [(c / n, l / n) for c, l in zip(correct.tolist(), loss.tolist())]

    def finetuned_state(self, genome: str, seed: int,
                        start: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The child ``genome`` (weights ``start`` when given, else its own) after the payload's fine-tuning
        on the training split, its family's constraint (a fixed mask) held after every step; a CPU
        ``state_dict``. A function of (genome, seed, start): any worker returns the same weights."""
        model = self._tuned_model(genome, seed, start)
        self._trained.pop(genome, None)  # fetched for the last time: its tuned successor replaces it
        return state_copy(model)

    def _tuned_model(self, genome: str, seed: int, start: dict[str, torch.Tensor] | None = None) -> torch.nn.Module:
        """A new model holding the child ``genome`` (or ``start``) after the payload's fine-tuning, in
        evaluation mode on this evaluator's device."""
        if self.payload.finetune is None or self.payload.train_x is None:
            raise ValueError("this payload carries no fine-tuning settings or training data")
        model = build_model(self.payload.model, self.payload.input_shape, self.payload.num_classes)
        model.load_state_dict(start if start is not None else self._materialised_state(genome))
        model.to(self.device)
        constraint = self.family.constraint(genome, self.materialiser)
        torch.manual_seed(seed)  # dropout masks, if the model has dropout
        train(model, Split(self.payload.train_x, self.payload.train_y), self.payload.finetune, seed=seed,
              parameter_filter=constraint, augment=self.payload.augment)  # ends in evaluation mode
        return model

    def child_state(self, genome: str) -> dict[str, torch.Tensor]:
        """A CPU copy of the child's full ``state_dict`` (kept from its evaluation, else rebuilt)."""
        self._check_parent(genome)
        if genome in self._trained:
            return self._trained[genome]
        if self.payload.tune_candidates:  # not tuned here (another worker, or before a restart): tune it again
            return self.finetuned_state(genome, tune_seed(genome))
        return self._materialised_state(genome)

    def _materialised_state(self, genome: str) -> dict[str, torch.Tensor]:
        if genome in self._trained and not self.payload.tune_candidates:
            return self._trained[genome]  # a family that trains its children: the child is its trained weights
        with self.materialiser.materialised(genome):
            return state_copy(self.model)


class ActivationCache:
    """Validation activations of the parent after its leading layers that no mutation touches.

    A candidate then runs only the remaining layers: identical results (the same operations on the same
    batches), a fraction of the work when mutations are restricted to late layers. The cache belongs to
    one evaluator, which belongs to one parent, so a new parent never sees stale activations.
    """

    def __init__(self, tail: list[torch.nn.Module], batches: list[torch.Tensor], start: int):
        self.tail = tail
        self.batches = batches
        self.start = start  # index of the first stage candidates run

    @classmethod
    @torch.inference_mode()
    def build(cls, model: torch.nn.Module, mutated: set[str], x: torch.Tensor, batch_size: int,
              budget_mb: float) -> "ActivationCache | None":
        """The cache for ``model`` whose parameters ``mutated`` may change, or None when the model is not a
        known chain of stages, its first stage with weights may change, or the activations exceed
        ``budget_mb``."""
        stages = model_stages(model)
        if not stages:
            return None
        names = {id(p): name for name, p in model.named_parameters()}
        start = next((i for i, stage in enumerate(stages)
                      if any(names.get(id(p)) in mutated for p in stage.parameters())), len(stages))
        if start == 0 or start == len(stages):
            return None
        head = torch.nn.Sequential(*stages[:start])
        if not any(True for _ in head.parameters()):
            return None  # leading stages without weights (a flatten) only copy the inputs: nothing to save
        first = head(x[:batch_size])
        batches_count = -(-len(x) // batch_size)
        if first.element_size() * first.numel() * batches_count > budget_mb * 2**20:
            return None
        batches = [first] + [head(x[b:b + batch_size]) for b in range(batch_size, len(x), batch_size)]
        return cls(stages[start:], batches, start)

    def forward(self, batch: int) -> torch.Tensor:
        """The model's output on validation batch ``batch``, from the cached activations."""
        out = self.batches[batch]
        for stage in self.tail:
            out = stage(out)
        return out

    @property
    def megabytes(self) -> float:
        """Memory the cached activations take."""
        return sum(b.element_size() * b.numel() for b in self.batches) / 2**20

