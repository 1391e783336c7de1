"""Several members per generate call give exactly the sequential evaluator's member results."""

import copy

import pytest
import torch

from ERO_EGGROLL.arc.tasks import load_tasks
from ERO_EGGROLL.config import ROOT, ConfigError, load_config
from ERO_EGGROLL.evaluation.evaluator import evaluate, evaluate_members, prepare, questions_for
from ERO_EGGROLL.model.qwen import run_perturber

POPULATION = 8
# Relative sigma 2.0, not smoke.yaml's 0.5: at 0.5 every member of a rebuilt tiny model can give the same answer,
# so k could not matter; at 2.0, 6-8 of the 8 members answer differently (seeds 0-3, the 2026-11-25 build).
SIGMA = 2.0


@pytest.fixture(scope="module")
def setup(tiny):
    model, processor = copy.deepcopy(tiny[0]), tiny[1]
    cfg = load_config(
        ROOT / "configs" / "smoke.yaml",
        [
            "data.task_ids=[b1fc8b8e]",
            "evaluation.max_new_tokens_cap=48",
            f"evolution.population_size={POPULATION}",
            f"evolution.sigma={SIGMA}",
        ],
    )
    prepared = prepare(questions_for(load_tasks(ids=cfg.data.task_ids), cfg, "fitness"), processor, cfg)
    perturber = run_perturber(model, cfg)
    sequential = []
    for member in range(POPULATION):
        with perturber.member(0, member):
            sequential.append(evaluate(model, processor, prepared, cfg))
    return model, processor, cfg, prepared, perturber, sequential


@pytest.mark.parametrize("k", [1, 2, 4, POPULATION])
def test_member_results_do_not_depend_on_k(setup, k):
    model, processor, cfg, prepared, perturber, sequential = setup
    assert len({tuple(a.text for a in r.answers) for r in sequential}) > 1  # members really differ
    batched = []
    for first in range(0, POPULATION, k):
        with perturber.members(0, range(first, first + k)):
            batched += evaluate_members(model, processor, prepared, cfg, k)
    assert [[a.text for a in r.answers] for r in batched] == [[a.text for a in r.answers] for r in sequential]
    assert [r.fitness for r in batched] == [r.fitness for r in sequential]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batched_logits_equal_sequential_bit_for_bit(tiny, setup, dtype):
    """One member and K members as rows run the same operations per row (biases too: x W^T, then the member's
    bias), so on this CPU, whose matmul rows do not depend on the other rows, the logits are the same bits."""
    cfg = setup[2]
    model = copy.deepcopy(tiny[0]).to(dtype)
    perturber = run_perturber(model, cfg)
    ids = torch.tensor([[5, 17, 42, 99, 7, 3, 250, 11]])
    with torch.no_grad():
        expected = []
        for member in (2, 5, 6):
            with perturber.member(1, member):
                expected.append(model(input_ids=ids).logits)
        with perturber.members(1, [2, 5, 6]):
            batched = model(input_ids=ids.repeat(3, 1)).logits
    assert torch.equal(batched, torch.cat(expected))


def test_weights_untouched_by_batched_members(setup):
    model, processor, cfg, prepared, perturber, _ = setup
    before = {n: p.clone() for n, p in model.named_parameters()}
    with perturber.members(0, range(4)):
        evaluate_members(model, processor, prepared, cfg, 4)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_batched_mode_needs_the_forward_strategy():
    with pytest.raises(ConfigError, match="members_per_batch > 1 needs evolution.strategy: forward"):
        load_config(ROOT / "configs" / "smoke.yaml", ["evaluation.members_per_batch=4", "evolution.strategy=inplace"])
