"""The evolved change as a PEFT LoRA adapter: the truncated SVD's fit, and a folder PeftModel.from_pretrained loads
onto the tiny Qwen2.5-VL with the weights and output the report promised."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from ERO_EGGROLL.config import ROOT, load_config
from ERO_EGGROLL.core.adapter import truncated
from ERO_EGGROLL.core.tensor_classes import ParamClass
from ERO_EGGROLL.io.adapter import export_lora_adapter
from ERO_EGGROLL.io.disk import OutputError
from ERO_EGGROLL.model.qwen import classify_model


def test_the_default_rank_keeps_the_stated_energy_and_reports_the_error():
    torch.manual_seed(0)
    low = torch.randn(40, 3) @ torch.randn(3, 30)
    delta = low + 1e-3 * torch.randn(40, 30)
    a, b, kept, error = truncated(delta, None, 0.99)
    assert a.shape == (3, 30) and b.shape == (40, 3)  # rank 3 holds the change; the noise is far below 1%
    assert kept >= 0.99 and error == pytest.approx(
        float(torch.linalg.matrix_norm(delta - b @ a) / delta.norm()), rel=1e-4
    )
    _, _, kept_1, error_1 = truncated(delta, 1, 0.99)
    assert kept_1 < kept and error_1 == pytest.approx((1 - kept_1) ** 0.5, rel=1e-4)


@pytest.fixture
def evolved(tiny, one_torch_thread):
    """(base model copy, evolved copy, base weights, classes): rank-2 changes on the LORA weights, new FULL values."""
    model, _ = tiny
    cfg = load_config(ROOT / "configs" / "smoke.yaml")
    classes = {s.name: s.cls for s in classify_model(model, cfg)}
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    best = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in best.named_parameters():
            if classes[name] is ParamClass.LORA:
                p += 0.01 * torch.randn(p.shape[0], 2, generator=gen) @ torch.randn(2, p.shape[1], generator=gen)
            elif classes[name] is ParamClass.FULL:
                p += 0.01 * torch.randn(p.shape, generator=gen)
    return copy.deepcopy(model), best, base, classes


def test_the_adapter_loads_with_peft_and_gives_the_reported_fitness(evolved, tmp_path):
    import peft  # requirements.txt installs it; elsewhere the extra [peft]

    base_model, best, base, classes = evolved
    ids = torch.arange(3, 19).reshape(2, 8)

    def fitness(model):
        with torch.no_grad():
            return -model(input_ids=ids).logits.float().square().mean().item()

    report = export_lora_adapter(best, base, classes, tmp_path / "adapter", fitness=fitness)
    assert {f.rank for f in report.fits} == {2} and all(f.relative_error < 1e-4 for f in report.fits)
    assert len(report.fits) == 14 and not report.left_out
    assert "model.language_model.layers.0.self_attn.q_proj.bias" in report.full
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert "model.language_model.layers.0.self_attn.q_proj" in config["target_modules"]
    assert config["bias"] == "lora_only" and "model.language_model.norm" in config["modules_to_save"]

    loaded = peft.PeftModel.from_pretrained(base_model, str(tmp_path / "adapter"))
    assert fitness(loaded) == pytest.approx(report.fitness_adapter, rel=1e-5)
    assert report.fitness_adapter == pytest.approx(report.fitness_full, rel=1e-3)  # rank 2 holds the rank-2 change
    merged = dict(loaded.merge_and_unload().named_parameters())
    for name, p in best.named_parameters():
        assert torch.allclose(merged[name], p, atol=1e-5), name  # every evolved tensor, the base ones as they were


def test_an_adapter_never_replaces_what_it_did_not_write(evolved, tmp_path):
    _, best, base, classes = evolved
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    with pytest.raises(OutputError, match="did not write"):
        export_lora_adapter(best, base, classes, foreign)
    assert (foreign / "notes.txt").read_text() == "keep"
    export_lora_adapter(best, base, classes, tmp_path / "adapter", rank=1)
    report = export_lora_adapter(best, base, classes, tmp_path / "adapter", rank=1)  # its own: replaced
    assert {f.rank for f in report.fits} == {1} and all(0 < f.relative_error < 1 for f in report.fits)
