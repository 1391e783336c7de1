"""Config loading: every bad input names the file, the key and what to do."""

import typing
from pathlib import Path

import pytest
from conftest import run_module, write_config

from ERO_EGGROLL.arc.fitness import METRICS
from ERO_EGGROLL.config import ROOT, ConfigError, EvaluationConfig, load_config
from ERO_EGGROLL.evaluation.evaluator import LIKELIHOOD_FITNESS


@pytest.mark.parametrize("name", ["default", "smoke", "qwen2_5_vl_7b"])
def test_shipped_configs_load(name):
    cfg = load_config(ROOT / "configs" / f"{name}.yaml")
    assert cfg.evolution.population_size % 2 == 0


def test_7b_config_matches_the_issue():
    cfg = load_config(ROOT / "configs" / "qwen2_5_vl_7b.yaml")
    evo = cfg.evolution
    assert (evo.epochs, evo.population_size, evo.sigma, evo.rank) == (12, 32, "auto", 2)  # sigma measured: issue 31
    # ERO's protocol: its metric, its token budget, two demonstration pairs; greedy decoding without a penalty
    assert (cfg.evaluation.fitness, cfg.evaluation.max_new_tokens_rule, cfg.data.max_train_examples) == (
        "char_similarity",
        "ero",
        2,
    )
    assert not cfg.evaluation.decoding.do_sample and cfg.evaluation.decoding.repetition_penalty == 1.0


def test_every_fitness_metric_is_selectable_and_only_those():
    assert set(typing.get_args(typing.get_type_hints(EvaluationConfig)["fitness"])) == set(METRICS) | {
        LIKELIHOOD_FITNESS
    }
    assert (
        load_config(ROOT / "configs" / "smoke.yaml", ["evaluation.fitness=grid_char_similarity"]).evaluation.fitness
        == "grid_char_similarity"
    )


def test_overrides_are_typed(tmp_path):
    cfg = load_config(
        ROOT / "configs" / "smoke.yaml",
        ["evolution.population_size=8", "data.task_ids=[b1fc8b8e]", "evolution.sigma=0.25"],
    )
    assert cfg.evolution.population_size == 8 and cfg.data.task_ids == ["b1fc8b8e"] and cfg.evolution.sigma == 0.25


@pytest.mark.parametrize(
    "text,message",
    [
        (
            "evolution:\n  population_sise: 8\n",
            r"evolution: unknown key 'population_sise'; did you mean 'population_size'\?",
        ),
        ("evolutoin: {}\n", r"top level: unknown key 'evolutoin'; did you mean 'evolution'\?"),
        ("evolution:\n  rank: two\n", r"evolution.rank: expected int, got str 'two'"),
        ("evolution:\n  population_size: 7\n", r"population_size must be even"),
        ("evolution:\n  rank: 0\n", r"evolution.rank must be >= 1"),
        ("evolution:\n  sigma: -0.1\n", r"evolution.sigma must be > 0"),
        ("evolution:\n  population_size: 8\n  group_size: 3\n", r"group_size 3 must be 0 or divide"),
        ("data:\n  input_mode: txt\n", r"'txt' is not one of .*did you mean 'text'"),
        ("evaluation:\n  max_new_tokens_cap: 0\n", r"max_new_tokens_cap must be >= 1"),
        (
            "evaluation:\n  max_new_tokens_rule: eros\n",
            r"'eros' is not one of 'target_tokens' \| 'ero' \| 'demonstrations'; did you mean 'ero'\?",
        ),
        (
            "evaluation:\n  max_new_tokens_rule: ero\n  max_new_tokens_factor: 3.0\n",
            r"max_new_tokens_factor applies to .*'target_tokens' and 'demonstrations' only",
        ),
        ("evaluation:\n  fitness: grid_char_similarty\n", r"did you mean 'grid_char_similarity'\?"),
        (
            "evaluation:\n  decoding:\n    preset: er\n",
            r"evaluation.decoding.preset: 'er' is not one of .*did you mean 'ero'\?",
        ),
        (
            "evaluation:\n  decoding:\n    preset: ero\n    repetition_penalty: 1.05\n",
            r"preset 'ero' reads .*remove the values",
        ),
        (
            "evaluation:\n  decoding:\n    do_sample: true\n  members_per_batch: 2\n",
            r"members_per_batch > 1 needs greedy decoding",
        ),
        ("evaluation:\n  decoding:\n    temperature: 0\n", r"temperature > 0"),
        ("evaluation:\n  greedy: true\n", r"unknown key 'greedy'"),
        (
            "data:\n  fitness_source: train_loo\n",
            r"'train_loo' reports held-out .*'target_tokens' sizes .* use max_new_tokens_rule: demonstrations",
        ),
        (
            "evolution:\n  log_gradient_cosine: true\n",
            r"log_gradient_cosine needs evaluation.fitness: answer_logprob .*got 'char_similarity'",
        ),
        ("evaluation:\n  fitness: answer_logprb\n", r"did you mean 'answer_logprob'\?"),
        ("data:\n  task_ids: []\n", r"task_ids is empty"),
        ("data:\n  source: /no/such/dir\n", r"no such directory"),
        ("evolution: [\n", r"malformed YAML at line 2"),
        ("- just\n- a list\n", r"top level must be a mapping"),
        ("evolution:\n  sigma: .inf\n", r"evolution.sigma must be a finite number, got inf"),
        (
            "evaluation:\n  max_new_tokens_factor: .nan\n",
            r"evaluation.max_new_tokens_factor must be a finite number, got nan",
        ),
        ("run:\n  target_fitness: -.inf\n", r"run.target_fitness must be a finite number, got -inf"),
        ("seed: 99999999999999999999\n", r"seed must be in 0..2\*\*32-1"),
        ("seed: 1e3\n", r"seed: expected int, got float 1000.0"),
        ("evolution:\n  lr: 1\n  lr: 2\n", r"duplicate key 'lr' at line 3"),
        ("evolution: {}\nevolution: {}\n", r"duplicate key 'evolution' at line 2"),
        ("", r"the file is empty"),
        ("# only a comment\n", r"the file is empty"),
        (f"run:\n  name: {'x' * 300}\n", r"run.name must be printable with at most 128 characters"),
        ("evolution:\n  reseed_step: 0\n", r"evolution.reseed_step must be in 1..4294967295"),
        ("evolution:\n  reseed_step: 1099511627776\n", r"evolution.reseed_step must be in 1..4294967295"),
        (
            "seed: 4294967295\nevolution:\n  search: ero\n  optimizer: sgd\n  reset_after: 3\n",
            r"seed 4294967295 \+ up to 4 of ERO's resets \(12 epochs, evolution.reset_after 3\) .* passes 2\*\*32-1",
        ),
        ("distributed:\n  connect_timeout_s: 1e308\n", r"connect_timeout_s must be > 0 and at most 86400 s"),
        ("run:\n  name: epoch_0001\n", r"run.name 'epoch_0001': no folder of it may be named like what a run"),
        ("run:\n  name: .pa.lock\n", r"run.name '.pa.lock': no folder"),
        ("run:\n  name: a/moved_aside-20250101\n", r"run.name 'a/moved_aside-20250101': no folder"),
        ("run:\n  name: a/best_model\n", r"no folder of it may be named"),
        ("run:\n  name: pa.lock\n", r"no folder of it may be named"),
    ],
)
def test_bad_configs_name_file_key_and_fix(tmp_path, text, message):
    path = write_config(tmp_path, text)
    with pytest.raises(ConfigError, match=message) as info:
        load_config(path)
    assert str(path) in str(info.value)


def test_missing_config_file_names_every_shipped_config(tmp_path):
    with pytest.raises(ConfigError, match="does not exist") as info:
        load_config(tmp_path / "nope.yaml")
    assert all(p.name in str(info.value) for p in (ROOT / "configs").glob("*.yaml"))


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(ROOT / "configs" / "smoke.yaml", ["evolution.rank"])


def test_cli_prints_resolved_config_and_fails_cleanly(tmp_path):
    code, out, _ = run_module("ERO_EGGROLL.config", "--config", str(ROOT / "configs/smoke.yaml"))
    assert code == 0 and "population_size: 4" in out
    code, _, err = run_module("ERO_EGGROLL.config", "--config", str(write_config(tmp_path, "seed: x\n")))
    assert code == 2 and "seed: expected int" in err and "Traceback" not in err


def test_scientific_notation_is_a_number(tmp_path):
    """YAML 1.1 reads 1e-3 as the string '1e-3'; a config means the number."""
    cfg = load_config(
        write_config(tmp_path, "evolution:\n  lr: 1e-3\n  sigma: 5E-2\n"), ["evolution.max_update_norm=2e+1"]
    )
    assert (cfg.evolution.lr, cfg.evolution.sigma, cfg.evolution.max_update_norm) == (0.001, 0.05, 20.0)
    assert load_config(write_config(tmp_path, "run:\n  name: 1e5x\n")).run.name == "1e5x"  # not every e is a number


def test_a_config_that_is_not_utf8(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("run:\n  name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8 text"):
        load_config(path)


def test_antithetic_defaults_by_the_search_as_in_for_module(tmp_path):
    """search: ero samples every member its own draw unless the config says otherwise; EGGROLL keeps its pairs."""
    ero = ["evolution.search=ero", "evolution.optimizer=sgd"]
    assert load_config(ROOT / "configs" / "smoke.yaml", ero).evolution.antithetic is False
    assert load_config(ROOT / "configs" / "smoke.yaml", [*ero, "evolution.antithetic=true"]).evolution.antithetic
    assert load_config(ROOT / "configs" / "smoke.yaml").evolution.antithetic is True


def _alias_bomb(tmp_path, levels: int = 9) -> Path:
    """data.task_ids as nested YAML aliases: a few hundred bytes that expand to 9**levels strings."""
    lines = ["data:", "  task_ids:", "    - &a0 [" + ",".join(["lol"] * 9) + "]"]
    lines += [f"    - &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, levels - 1)]
    lines.append("    - [" + ",".join([f"*a{levels - 2}"] * 9) + "]")
    return write_config(tmp_path, "\n".join(lines) + "\n")


def test_a_yaml_alias_bomb_is_refused_in_little_memory(tmp_path):
    """482 bytes of aliases expand to 9**9 strings; the old message printed them all (> 6 GB). With the address space
    capped at 512 MiB more than now, loading must end in one short ConfigError."""
    import resource

    bomb = _alias_bomb(tmp_path)
    vm = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmSize"))
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (vm + 512 * 2**20, hard))
    try:
        with pytest.raises(ConfigError, match="expands to more than 100000 values") as info:
            load_config(bomb)
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    assert len(str(info.value)) < 400


def test_messages_cut_long_values(tmp_path):
    """A wrong value of thousands of items (no aliases) is shown cut, never whole."""
    path = write_config(tmp_path, "data:\n  task_ids: [" + ", ".join(["[x]"] * 1000) + "]\n")
    with pytest.raises(ConfigError, match=r"data.task_ids: expected str or list\[str\], got list \[\['x'\], ") as info:
        load_config(path)
    assert len(str(info.value)) < 400


@pytest.mark.parametrize(
    "override, message",
    [
        ("seed=" + "9" * 5000, r"a YAML value cannot be read: Exceeds the limit"),
        ("data.task_ids=*nope", r"malformed YAML at line 1, column 1: found undefined alias 'nope'"),
        ("data.task_ids=" + "[" * 3000 + "]" * 3000, r"nests lists or mappings too deeply"),
        ("data.task_ids=!!python/object:os.system ls", r"could not determine a constructor"),
    ],
)
def test_bad_override_values_are_one_short_line(override, message):
    """Each of these was a traceback (ValueError, ComposerError, RecursionError, ConstructorError)."""
    with pytest.raises(ConfigError, match=message) as info:
        load_config(ROOT / "configs" / "smoke.yaml", [override])
    assert len(str(info.value)) < 400
