"""Reading a run config: strict YAML, `--set section.key=value` overrides, types, then validation.

Validation happens here, where the input enters, so a typo costs seconds instead of a run.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from pathlib import Path

import yaml

from ERO_EGGROLL.config.schema import ROOT, Config
from ERO_EGGROLL.config.typed import build, shown
from ERO_EGGROLL.config.validation import validate
from ERO_EGGROLL.core.errors import ConfigError
from ERO_EGGROLL.core.settings import EvolutionSettings, default_antithetic


class _StrictLoader(yaml.SafeLoader):
    """safe_load, but `1e-3` is a number (YAML 1.1 reads it as a string) and a repeated key is an error."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                mark = key_node.start_mark
                raise ConfigError(
                    f"duplicate key {key!r} at line {mark.line + 1} (the later value would silently win); keep one"
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


# YAML 1.2 floats: 1e-3, 1E+5, -2.5e3 (the 1.1 resolver needs a dot and a signed exponent)
_StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


MAX_VALUES = 100_000  # scalars, lists and mappings in a config once YAML aliases are expanded; real configs hold < 1000


def _expanded_size(value, budget: int) -> int:
    """How many values `value` holds with every alias expanded, counting no further than `budget` (an alias bomb
    of a few hundred bytes expands to billions: it is counted only up to the budget, never expanded)."""
    count, todo = 0, [value]
    while todo and count <= budget:
        item = todo.pop()
        count += 1
        if isinstance(item, dict):
            todo += [*item.keys(), *item.values()]
        elif isinstance(item, list):
            todo += item
    return count


def _yaml_load(text: str):
    """The YAML `text`, or one ConfigError line: malformed YAML (with where), an integer of thousands of digits,
    nesting deeper than Python recurses, or more values than a config needs once aliases expand."""
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"malformed YAML{at}: {getattr(err, 'problem', err)}") from None
    except RecursionError:
        raise ConfigError("the YAML nests lists or mappings too deeply; a config needs a few levels") from None
    except ValueError as err:  # e.g. an integer of more than 4300 digits
        raise ConfigError(f"a YAML value cannot be read: {str(err).splitlines()[0][:200]}") from None
    if _expanded_size(data, MAX_VALUES) > MAX_VALUES:
        raise ConfigError(
            f"the YAML expands to more than {MAX_VALUES} values (aliases repeated inside aliases?); write the "
            "values out, a config needs far fewer"
        )
    return data


# --- building dataclasses from plain data, with precise errors ------------------------------------


def _apply_override(data: dict, override: str) -> None:
    if "=" not in override:
        raise ConfigError(f"--set {shown(override)}: expected section.key=value")
    dotted, raw = override.split("=", 1)
    try:
        value = _yaml_load(raw) if raw else ""
    except ConfigError as err:
        raise ConfigError(f"--set {shown(override)}: {err}") from None
    node = data
    *parents, leaf = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {shown(override)}: {part!r} is not a section")
    node[leaf] = value


def _default_antithetic(data: dict) -> None:
    """evolution.antithetic, when the config does not set it, defaults by the search as in Perturber.for_module: off for
    search: ero (every member its own draw, as ERO samples; two elites of one pair would cancel), on otherwise."""
    evolution = data.get("evolution")
    if isinstance(evolution, dict) and "antithetic" not in evolution:
        evolution["antithetic"] = default_antithetic(evolution.get("search", EvolutionSettings.search))


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> Config:
    """Read, override, type-check and validate a YAML config."""
    path = Path(path)
    if not path.is_file():
        shipped = ", ".join(sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
        raise ConfigError(f"config file {path} does not exist (configs/ holds {shipped})")
    try:
        data = _yaml_load(path.read_text(encoding="utf-8"))
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte {err.start}); save the YAML as UTF-8") from None
    if data is None:
        raise ConfigError(
            f"{path}: the file is empty (or only comments); start from configs/default.yaml, which lists every section"
        )
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    return config_from_dict(data, str(path), overrides)


def config_from_dict(data: dict, where: str = "<dict>", overrides: Sequence[str] = ()) -> Config:
    """The same checks for a config held in memory (a checkpoint's saved config), after `--set` overrides."""
    data = copy.deepcopy(data)
    try:
        for override in overrides:
            _apply_override(data, override)
        _default_antithetic(data)
        cfg = build(Config, data, "")
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None
    validate(cfg, where)
    return cfg
