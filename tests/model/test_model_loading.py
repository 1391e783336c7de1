"""One door for real and embedded models, with clear errors for what is not a Qwen2.5-VL checkpoint."""

import json
import shutil

import pytest
import torch

from ERO_EGGROLL.cli import doctor
from ERO_EGGROLL.config import ROOT, Config
from ERO_EGGROLL.model.loading import (
    ModelLoadError,
    check_checkpoint_dir,
    check_weight_files,
    load_model,
    load_model_from_dir,
)


def test_embedded_model_loads_through_load_model(tiny_model_dir):
    cfg = Config()
    cfg.model.path = str(tiny_model_dir)
    model, processor = load_model(cfg)
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert next(model.parameters()).dtype == torch.float32  # auto = fp32 on the CPU
    assert 300_000 < sum(p.numel() for p in model.parameters()) < 5_000_000
    assert processor.tokenizer.convert_tokens_to_ids("<|image_pad|>") == model.config.image_token_id


def test_dtype_from_config(tiny_model_dir):
    model, _ = load_model_from_dir(tiny_model_dir, dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16


def test_missing_directory_says_where_to_put_weights(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist; put a Qwen2.5-VL checkpoint there"):
        load_model_from_dir(tmp_path / "Qwen2.5-VL-7B-Instruct")


def test_directory_without_config(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match=r"has no config.json \(found: weights.bin\)"):
        load_model_from_dir(tmp_path)


def test_other_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ModelLoadError, match="describes a 'llama' model, not 'qwen2_5_vl'"):
        load_model_from_dir(tmp_path)


def test_truncated_safetensors(tiny_model_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ModelLoadError, match="truncated or corrupt"):
        load_model_from_dir(broken)


def test_config_json_that_is_not_an_object(tmp_path):
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ModelLoadError, match="holds a JSON list, not an object of model settings"):
        load_model_from_dir(tmp_path)


def test_a_model_folder_without_tokenizer_files_is_refused_before_loading(tiny_model_dir, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(tiny_model_dir, copy)
    (copy / "tokenizer.json").unlink()
    with pytest.raises(ModelLoadError, match=r"has no tokenizer files \(tokenizer_config.json \+ tokenizer.json or"):
        check_checkpoint_dir(copy)


def test_truncated_weights_are_found_by_reading_every_byte(tiny_model_dir, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(tiny_model_dir, copy)
    assert "57 tensors" in check_weight_files(copy)
    weights = copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # the header still parses: only the size gives it away
    with pytest.raises(ModelLoadError, match="is truncated or damaged: .* bytes, its header describes"):
        check_weight_files(copy)


def test_doctor_takes_set_and_fails_a_model_without_tokenizer(tiny_model_dir, tmp_path, capsys):
    copy = tmp_path / "model"
    shutil.copytree(tiny_model_dir, copy)
    (copy / "tokenizer_config.json").unlink()
    assert doctor.main(["--config", str(ROOT / "configs" / "smoke.yaml"), "--set", f"model.path={copy}"]) == 1
    assert "[FAIL] model: ModelLoadError" in capsys.readouterr().out


@pytest.fixture
def fifo_model(tiny_model_dir, tmp_path):
    """The tiny model's folder (links to its files) with a FIFO where model.safetensors should be. While the test
    runs, a helper thread keeps opening the FIFO for writing (and closing it), so that code which wrongly reads it
    gets an empty file instead of blocking for ever."""
    import os
    import threading

    folder = tmp_path / "model"
    folder.mkdir()
    for entry in tiny_model_dir.iterdir():
        if entry.name != "model.safetensors":
            (folder / entry.name).symlink_to(entry)
    fifo = folder / "model.safetensors"
    os.mkfifo(fifo)
    done = threading.Event()

    def unblock_readers() -> None:
        while not done.wait(0.2):
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass  # no reader at the moment

    thread = threading.Thread(target=unblock_readers, daemon=True)
    thread.start()
    yield folder
    done.set()
    thread.join()


def test_a_fifo_in_the_model_folder_is_refused_before_anything_reads_it(fifo_model, capsys):
    """The doctor used to block for ever on a FIFO where a model file should be; the weights' hash likewise."""
    from ERO_EGGROLL.core.digest import files_digest
    from ERO_EGGROLL.core.errors import EggrollError

    with pytest.raises(ModelLoadError, match=r"model.safetensors in the model folder is a FIFO, not a regular file"):
        check_checkpoint_dir(fifo_model)
    with pytest.raises(EggrollError, match="is not a regular file"):
        files_digest([fifo_model / "model.safetensors"])
    assert doctor.main(["--config", str(ROOT / "configs" / "smoke.yaml"), "--set", f"model.path={fifo_model}"]) == 1
    assert "[FAIL] model: ModelLoadError" in capsys.readouterr().out
