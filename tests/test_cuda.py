"""The exactness promises on a CUDA GPU: members restore bit for bit, K members as rows give one member's results,
and replay rebuilds a run's weights bit for bit. Skipped with the reason on a machine without CUDA;
`scripts/gpu_check.py` runs them (`pytest -m cuda`)."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from conftest import run_args

from ERO_EGGROLL.arc.tasks import load_tasks
from ERO_EGGROLL.config import ROOT, load_config
from ERO_EGGROLL.evaluation.evaluator import evaluate, evaluate_members, prepare, questions_for
from ERO_EGGROLL.model.qwen import run_perturber

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA GPU (none here); scripts/gpu_check.py runs these on one"
    ),
]

IDS = torch.tensor([[5, 17, 42, 99, 7, 3, 250, 11, 64, 128, 33, 2]])
POPULATION = 4


def _config(*overrides: str):
    return load_config(
        ROOT / "configs" / "smoke.yaml",
        [
            "data.task_ids=[b1fc8b8e]",
            "evaluation.max_new_tokens_cap=48",
            f"evolution.population_size={POPULATION}",
            "evolution.sigma=2.0",
            *overrides,
        ],
    )


@pytest.mark.parametrize("strategy", ["forward", "inplace"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_restore_is_bit_identical_on_cuda(tiny, strategy, dtype):
    model = copy.deepcopy(tiny[0]).to("cuda", dtype)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    perturber = run_perturber(model, _config(f"evolution.strategy={strategy}"))
    try:
        for member in range(POPULATION):
            with torch.no_grad(), perturber.member(1, member):
                model(input_ids=IDS.cuda())
            for n, p in model.named_parameters():
                assert torch.equal(p, before[n]), f"{n} changed after member {member}"
    finally:
        perturber.remove_hooks()


@pytest.mark.parametrize("k", [2, POPULATION])
def test_k_members_as_rows_equal_one_member_on_cuda(tiny, k):
    model, processor = copy.deepcopy(tiny[0]).to("cuda"), tiny[1]
    cfg = _config("model.device=cuda")
    prepared = prepare(questions_for(load_tasks(ids=cfg.data.task_ids), cfg, "fitness"), processor, cfg)
    perturber = run_perturber(model, cfg)
    try:
        sequential = []
        for member in range(POPULATION):
            with perturber.member(0, member):
                sequential.append(evaluate(model, processor, prepared, cfg))
        batched = []
        for first in range(0, POPULATION, k):
            with perturber.members(0, range(first, first + k)):
                batched += evaluate_members(model, processor, prepared, cfg, k)
    finally:
        perturber.remove_hooks()
    assert [[a.text for a in r.answers] for r in batched] == [[a.text for a in r.answers] for r in sequential]
    assert [r.fitness for r in batched] == [r.fitness for r in sequential]


def test_replay_rebuilds_a_cuda_run_bit_for_bit(tmp_path, tiny_model_dir):
    args = run_args(
        tmp_path,
        "cuda_run",
        "model.device=cuda",
        "model.dtype=bfloat16",
        "evolution.population_size=2",
        "evaluation.max_new_tokens_cap=16",
    )
    done = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    check = subprocess.run(
        [sys.executable, "-m", "ERO_EGGROLL.replay", str(tmp_path / "checkpoints" / "cuda_run"), "--check"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert check.returncode == 0 and "bit-identical to the run record" in check.stdout, check.stdout + check.stderr
