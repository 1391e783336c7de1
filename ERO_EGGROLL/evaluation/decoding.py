"""Which decoding a run's generations use, resolved once from the config (and the checkpoint, under preset 'ero')."""

from __future__ import annotations

import json

from ERO_EGGROLL.config import Config
from ERO_EGGROLL.core.errors import EggrollError


class DecodingError(EggrollError):
    """The decoding that the config names cannot be resolved."""


DECODING_FIELDS = ("do_sample", "temperature", "top_p", "top_k", "repetition_penalty")
# What transformers 5.x's generate() fills in for every generation parameter left unset, pinned here because it has no
# public API for them (tests/evaluation/test_evaluator.py compares them with the installed transformers). Setting all
# of them means generate() takes nothing from a checkpoint's generation_config.json.
GENERATE_DEFAULTS: dict = {
    "min_length": 0,
    "do_sample": False,
    "use_cache": True,
    "early_stopping": False,
    "num_beams": 1,
    "temperature": 1.0,
    "top_k": 50,
    "top_p": 1.0,
    "typical_p": 1.0,
    "repetition_penalty": 1.0,
    "length_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0,
    "bad_words_ids": None,
    "num_return_sequences": 1,
    "output_scores": False,
    "return_dict_in_generate": False,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "remove_invalid_values": False,
    "exponential_decay_length_penalty": None,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
    "encoder_repetition_penalty": 1.0,
    "num_assistant_tokens": 20,
    "num_assistant_tokens_schedule": "constant",
    "assistant_confidence_threshold": 0.4,
    "assistant_lookbehind": 10,
    "target_lookbehind": 10,
    "num_beam_groups": 1,
    "diversity_penalty": 0.0,
}


def resolved_decoding(cfg: Config) -> dict:
    """The decoding values in force: the config's, or (preset 'ero') the base checkpoint's generation_config.json
    as transformers would complete it, which is what ERO's evaluation used. Recorded in the run's metrics; `prepare`
    resolves it once for its questions, so generation reads no file per member."""
    dec = cfg.evaluation.decoding
    if dec.preset == "explicit":
        return {name: getattr(dec, name) for name in DECODING_FIELDS}
    path = cfg.resolve_path(cfg.model.path) / "generation_config.json"
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DecodingError(
            f"evaluation.decoding.preset 'ero' reads the base checkpoint's {path}, which cannot be read "
            f"({err}); copy it from the downloaded checkpoint, or use preset 'explicit'"
        ) from None
    return {name: saved.get(name, GENERATE_DEFAULTS[name]) for name in DECODING_FIELDS}
