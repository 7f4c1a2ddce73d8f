"""Activation caching: candidates that can only differ in late layers run just those layers, with
results identical to full forward passes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from evo_subens.core.config import ChildrenConfig, ModelConfig
from evo_subens.core.worker import parent_fingerprint
from evo_subens.tasks.classification.evaluation import CandidateEvaluator, EvaluationPayload
from evo_subens.families import make_family
from evo_subens.tasks.classification.models import build_model, model_stages
from evo_subens.nn import state_copy

SHAPES = {"mlp": (1, 8, 8), "cnn1d": (1, 40), "cnn2d": (1, 12, 12), "lenet": (1, 12, 12)}


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_stages_compose_to_the_forward_pass(name):
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=name), SHAPES[name], 10).eval()
    x = torch.randn(5, *SHAPES[name])
    out = x
    for stage in model_stages(model):
        out = stage(out)
    assert torch.equal(out, model(x))
    assert {p for s in model_stages(model) for p in s.parameters()} == set(model.parameters())


def test_models_without_a_known_chain_have_no_stages():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 2), nn.Linear(4, 2)

        def forward(self, x):
            return self.a(x) + self.b(x)

    assert model_stages(Branchy()) is None
    assert len(model_stages(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)))) == 3


def _evaluator(layers: list[str], cache_mb: float, name: str = "cnn2d",
               autocast: str = "off") -> tuple[CandidateEvaluator, list[str]]:
    torch.manual_seed(0)
    shape = SHAPES[name]
    model_cfg = ModelConfig(name=name)
    state = state_copy(build_model(model_cfg, shape, 10))
    children = ChildrenConfig(density=0.2, sigma=0.5, layers=layers)
    generator = torch.Generator().manual_seed(1)
    payload = EvaluationPayload(model=model_cfg, input_shape=shape, num_classes=10, parent_state=state,
                                parent_id=parent_fingerprint(state), children=children,
                                val_x=torch.randn(250, *shape, generator=generator),
                                val_y=torch.randint(0, 10, (250,), generator=generator), batch_size=100,
                                threads=1, activation_cache_mb=cache_mb, autocast=autocast)
    family = make_family(children)
    genomes = [g for _, g in family.propose([family.root(payload.parent_id)], 6, np.random.default_rng(0))]
    return CandidateEvaluator(payload), genomes


@pytest.mark.parametrize("name", [pytest.param("cnn2d", marks=pytest.mark.slow), "mlp"])
def test_cached_scores_equal_full_forward_scores(name):
    late = ["head.*", "classifier.*"] if name == "cnn2d" else ["classifier.*"]
    cached, genomes = _evaluator(late, 64.0, name)
    full, _ = _evaluator(late, 0.0, name)
    assert cached.activation_cache is not None and full.activation_cache is None
    assert cached.activation_cache.start == len(model_stages(cached.model)) - (3 if name == "cnn2d" else 1)
    assert len(cached.activation_cache.batches) == 3  # 250 samples in batches of 100
    for genome in genomes:
        a, b = cached.evaluate(genome), full.evaluate(genome)
        assert a.values == b.values
    assert cached.score_current() == full.score_current()  # the parent is back, cache still valid


def test_no_cache_when_the_first_layer_can_change_or_memory_is_short():
    assert _evaluator(["*"], 64.0)[0].activation_cache is None
    assert _evaluator(["head.*", "classifier.*"], 1e-4)[0].activation_cache is None


def test_families_that_train_children_never_cache():
    evaluator, _ = _evaluator(["*"], 64.0)
    sparse = make_family(ChildrenConfig(family="sparse"))
    assert sparse.mutated_parameters(evaluator.model) is None


@pytest.mark.slow
def test_autocast_scores_close_to_fp32_and_cache_still_exact():
    late = ["head.*", "classifier.*"]
    exact, genomes = _evaluator(late, 0.0)
    mixed_full, _ = _evaluator(late, 0.0, autocast="bf16")
    mixed_cached, _ = _evaluator(late, 64.0, autocast="bf16")
    for genome in genomes[:3]:
        a, b, c = exact.evaluate(genome), mixed_full.evaluate(genome), mixed_cached.evaluate(genome)
        assert abs(a.values[1] - b.values[1]) < 0.05 * a.values[1] and abs(a.values[0] - b.values[0]) <= 0.02
        assert b.values == c.values


@pytest.mark.slow
def test_stacked_candidates_score_like_single_passes():
    late = ["head.*", "classifier.*"]
    single, genomes = _evaluator(late, 64.0)
    stacked, _ = _evaluator(late, 64.0)
    stacked.payload.stack_candidates = 4
    one_by_one = [single.evaluate(g) for g in genomes]
    together = stacked.evaluate_many(genomes[:4]) + stacked.evaluate_many(genomes[4:])
    for a, b in zip(one_by_one, together):
        assert a.values[0] == b.values[0] and b.values[1] == pytest.approx(a.values[1], rel=1e-6)
    assert stacked.score_current() == single.score_current()  # every candidate was undone


@pytest.mark.slow
def test_stacking_falls_back_without_a_cache():
    full, genomes = _evaluator(["*"], 64.0)
    full.payload.stack_candidates = 4
    assert [s.values for s in full.evaluate_many(genomes[:4])] == \
        [s.values for s in (full.evaluate(g) for g in genomes[:4])]


@pytest.mark.slow
def test_a_run_with_stacking_selects_the_same_members(tmp_path):
    from evo_subens.core.runner import run

    from conftest import tiny_dict

    late = {"children": {"layers": ["classifier.*"]}}
    one = run(tiny_dict(tmp_path, dict(late, name="one")), progress=lambda line: None)
    four = run(tiny_dict(tmp_path, dict(late, name="four", workers={"executor": "local", "stack_candidates": 4})),
               progress=lambda line: None)
    assert four.member_genomes == one.member_genomes
    assert four.population.val_accuracy.tolist() == one.population.val_accuracy.tolist()
    assert four.population.val_nll.tolist() == pytest.approx(one.population.val_nll.tolist(), rel=1e-6)
