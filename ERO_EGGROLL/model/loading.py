"""The one door in: a local Qwen2.5-VL checkpoint directory -> (model, processor).

The embedded tiny model and a downloaded Qwen2.5-VL-7B go through the same code. The processor
is image-only because the stock one insists on a video processor, which needs torchvision,
which has no CPU build here.
"""

from __future__ import annotations

import json
import stat
import struct
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import ProcessorMixin, Qwen2_5_VLProcessor

from ERO_EGGROLL.config import EMBEDDED_MODEL_DIR, Config, ConfigError
from ERO_EGGROLL.core.errors import EggrollError

DOWNLOAD_HINT = (
    "put a Qwen2.5-VL checkpoint there (config.json, *.safetensors, tokenizer files, preprocessor_config.json), e.g. "
    "the files of Qwen/Qwen2.5-VL-7B-Instruct downloaded on a machine with internet, or point model.path at the "
    f"embedded default {EMBEDDED_MODEL_DIR} (built by `python scripts/build_tiny_model.py`)"
)


# What load_processor reads besides the weights; each entry: alternative sets of files.
PROCESSOR_FILES = {
    "tokenizer files": (
        ("tokenizer_config.json", "tokenizer.json"),
        ("tokenizer_config.json", "vocab.json", "merges.txt"),
    ),
    "image processor config": (("preprocessor_config.json",), ("processor_config.json",)),
}


class ModelLoadError(EggrollError):
    """A model directory that cannot be loaded, with what was found and how to fix it."""


# The class that processor_config.json and tokenizer_config.json name, so that AutoProcessor elsewhere builds the real
# one.
STANDARD_PROCESSOR_CLASS = "Qwen2_5_VLProcessor"


class ImageOnlyQwen2_5_VLProcessor(Qwen2_5_VLProcessor):
    """Qwen2.5-VL processor with tokenizer and image processor only (no video processor).

    How files are loaded here, not what they are: whatever it saves names the stock class."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    def to_dict(self) -> dict:
        return {**super().to_dict(), "processor_class": STANDARD_PROCESSOR_CLASS}

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs) -> list[str]:
        files = super().save_pretrained(save_directory, push_to_hub, **kwargs)
        # ProcessorMixin wrote this class's own name there
        self.tokenizer._set_processor_class(STANDARD_PROCESSOR_CLASS)
        self.tokenizer.save_pretrained(save_directory)
        return files


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("model.device is 'cuda' but torch sees no GPU here; use 'auto' or 'cpu'")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


def special_file(path: Path) -> str | None:
    """What `path` is (links followed) when it is neither a regular file nor a folder: a FIFO, a device, a
    socket; None otherwise (a missing path or a dangling link included: reading it fails at once, never blocks)."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return None
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    return "a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a device"


def check_checkpoint_dir(path: Path) -> None:
    """Raise ModelLoadError unless `path` looks like a Qwen2.5-VL checkpoint directory."""
    if not path.exists():
        raise ModelLoadError(f"model directory {path} does not exist; {DOWNLOAD_HINT}")
    if not path.is_dir():
        raise ModelLoadError(f"model path {path} is a file, not a checkpoint directory; {DOWNLOAD_HINT}")
    for entry in path.iterdir():  # opening a FIFO or a device blocks for ever (doctor, load, digest): refuse it first
        kind = special_file(entry)
        if kind:
            raise ModelLoadError(
                f"{entry} in the model folder is {kind}, not a regular file or folder; replace it with the file "
                f"itself; {DOWNLOAD_HINT}"
            )
    config_file = path / "config.json"
    found = sorted(p.name for p in path.iterdir())[:12]
    if not config_file.is_file():
        raise ModelLoadError(f"{path} has no config.json (found: {', '.join(found) or 'nothing'}); {DOWNLOAD_HINT}")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ModelLoadError(f"{config_file} is not valid JSON (line {err.lineno}): {err.msg}") from None
    except UnicodeDecodeError as err:
        raise ModelLoadError(f"{config_file} is not UTF-8 text (byte {err.start}); re-copy it") from None
    if not isinstance(config, dict):
        raise ModelLoadError(
            f"{config_file} holds a JSON {type(config).__name__}, not an object of model settings; re-copy it"
        )
    if config.get("model_type") != "qwen2_5_vl":
        raise ModelLoadError(
            f"{config_file} describes a {config.get('model_type')!r} model, not 'qwen2_5_vl'; {DOWNLOAD_HINT}"
        )
    if not any(path.glob("*.safetensors")):
        raise ModelLoadError(f"{path} has no *.safetensors weights (found: {', '.join(found)}); {DOWNLOAD_HINT}")
    names = {p.name for p in path.iterdir()}
    for what, options in PROCESSOR_FILES.items():
        if not any(all(f in names for f in option) for option in options):
            wanted = " or ".join(" + ".join(option) for option in options)
            raise ModelLoadError(
                f"{path} has no {what} ({wanted}); the run would fail when it first generates; {DOWNLOAD_HINT}"
            )


def check_weight_files(path: Path) -> str:
    """Read every *.safetensors file whole: its header must parse and its size match the header's tensors.

    Catches truncated or damaged copies before a run spends time on them; returns a summary."""
    total, tensors = 0, 0
    for file in sorted(path.glob("*.safetensors")):
        try:
            with open(file, "rb") as f:
                (header_len,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(header_len)) if header_len < 100_000_000 else None
                if not isinstance(header, dict):
                    raise ValueError("its header is not a JSON object")
                ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
                expected = 8 + header_len + max(ends, default=0)
                while f.read(1 << 24):  # every byte must be readable
                    pass
                size = f.tell()
        except (OSError, ValueError, KeyError, TypeError, IndexError, struct.error) as err:
            raise ModelLoadError(f"{file} is damaged ({err}); re-copy the weights") from None
        if size != expected:
            raise ModelLoadError(
                f"{file} is truncated or damaged: {size} bytes, its header describes {expected}; re-copy the weights"
            )
        total, tensors = total + size, tensors + len(ends)
    return f"{tensors} tensors, {total / 2**20:.1f} MiB, every byte readable"


def load_processor(path: str | Path) -> ImageOnlyQwen2_5_VLProcessor:
    from transformers import AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    image_processor = Qwen2VLImageProcessorPil.from_pretrained(path)
    return ImageOnlyQwen2_5_VLProcessor(image_processor, tokenizer, chat_template=tokenizer.chat_template)


def load_model_from_dir(
    path: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    attn_implementation: str = "sdpa",
):
    """(model, processor) from a local directory: eval mode, no autograd, never remote code."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    path = Path(path)
    check_checkpoint_dir(path)
    try:
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            path, dtype=dtype, trust_remote_code=False, attn_implementation=attn_implementation
        )
    except (OSError, ValueError, RuntimeError, SafetensorError) as err:
        raise ModelLoadError(
            f"could not load the weights in {path}: {str(err).splitlines()[0]} "
            "(a truncated or corrupt *.safetensors file? re-copy or rebuild it)"
        ) from None
    model.to(device)  # type: ignore[arg-type]  # transformers types .to as PreTrainedModel's, not Module.to(device)
    model.eval().requires_grad_(False)
    return model, load_processor(path)


def load_model(cfg: Config):
    """(model, processor) as the config says: dtype `auto` = bf16 on GPU, fp32 on CPU; device `auto` = cuda if
    available."""
    device = resolve_device(cfg.model.device)
    return load_model_from_dir(
        cfg.resolve_path(cfg.model.path),
        dtype=resolve_dtype(cfg.model.dtype, device),
        device=device,
        attn_implementation=cfg.model.attn_implementation,
    )
