"""Config values are type- and range-checked when the config is loaded (``neva_tools.config.values``): each refused
value is one line naming the key, the value and what it must be, listed with the other loading problems, and
``neva config validate`` and ``neva train`` exit 2 on them, without a traceback. A recipe that is not a YAML mapping
is our error too. A fuzz test mutates values and recipe files: exit status 0, 1 or 2, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from neva_tools.cli.main import main
from neva_tools.config.load import BASE_CONFIG, load_config
from neva_tools.config.values import CHECKED_ELSEWHERE, VALUES, Rule
from neva_tools.errors import NevaError

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "recipes" / "tiny_cpu" / "stage1_pretrain.yaml"


@pytest.fixture(autouse=True)
def _plain_process(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(var, raising=False)


BAD_VALUES = [
    ("trainer.max_steps=abc", "trainer.max_steps (abc) must be an integer ≥ 1, or -1"),
    ("model.optim.lr=abc", "model.optim.lr (abc) must be a number > 0"),
    ("model.tensor_model_parallel_size=0", "model.tensor_model_parallel_size (0) must be an integer ≥ 1"),
    ("trainer.max_steps=0", "trainer.max_steps (0) must be an integer ≥ 1, or -1"),
    ("exp_manager.checkpoint_every_n_steps=-1", "exp_manager.checkpoint_every_n_steps (-1) must be an integer ≥ 0"),
    ("model.micro_batch_size=1.5", "model.micro_batch_size (1.5) must be an integer ≥ 1"),
    ("model.data.packing=maybe", "model.data.packing (maybe) must be true or false"),
    ("model.optim.betas=[0.9]", "model.optim.betas ([0.9]) must be two numbers [a, b] each ≥ 0 and < 1"),
    ("model.optim.sched.warmup_ratio=1.5", "model.optim.sched.warmup_ratio (1.5) must be a number ≥ 0 and < 1"),
    ("trainer.max_epochs=0", "trainer.max_epochs (0) must be a number > 0, or -1 or null"),
    ("model.seed=-1", "model.seed (-1) must be an integer ≥ 0 and < 4294967296"),
    ("model.optim.sched.name=linear", "model.optim.sched.name (linear) must be one of CosineAnnealing"),
    ("model.data.max_seq_length=.inf", "model.data.max_seq_length (inf) must be an integer ≥ 1"),
    ("exp_manager.exp_dir=[a]", "exp_manager.exp_dir (['a']) must be a path"),
    ("model.optim.lr=[1]", "model.optim.lr ([1]) must be a number > 0"),
    ("model.mm_cfg.llm.from_pretrained=7", "model.mm_cfg.llm.from_pretrained (7) must be a path, or null"),
]


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(("override", "message"), BAD_VALUES, ids=[o for o, _ in BAD_VALUES])
def test_config_validate_refuses_the_value(override: str, message: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(capsys, "config", "validate", "--offline", override)
    assert code == 2, (out, err)
    assert err.startswith("neva: error: ") and message in err, err
    assert "Traceback" not in err and err.count("\n") == 1  # one line


@pytest.mark.parametrize("override", [o for o, _ in BAD_VALUES[:5]])
def test_train_refuses_the_value_before_anything_runs(override: str, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    code, _, err = _run(capsys, "train", f"exp_manager.exp_dir={tmp_path / 'runs'}", override)
    key, _, value = override.partition("=")
    assert code == 2 and f"{key} ({value})" in err and "Traceback" not in err, err
    assert not (tmp_path / "runs").exists()


def test_refused_values_are_listed_together_with_unknown_keys(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run(capsys, "config", "validate", "--offline", "trainer.max_steps=abc", "model.optim.lr=abc",
                        "model.tensor_model_parallel_size=0", "exp_manager.checkpoint_every_n_steps=-1",
                        "model.optim.lrr=1")  # fmt: skip
    assert code == 2
    for part in ("model.optim.lrr", "trainer.max_steps (abc)", "model.optim.lr (abc)",
                 "model.tensor_model_parallel_size (0)", "exp_manager.checkpoint_every_n_steps (-1)"):  # fmt: skip
        assert part in err, err
    assert err.startswith("neva: error: 1 unknown config key(s)") and "Traceback" not in err


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("- a\n- b\n", "must be a YAML mapping of keys (like conf/neva_config.yaml: trainer:, model:, ...), but it "
                       "holds a list"),
        ("just a string\n", "holds the single value just a string"),
        ("5\n", "holds the single value 5"),
        ("trainer: {max_steps: [\n", "is not valid YAML: line 2, column 1: did not find expected node content"),
        ("trainer:\n  max_steps: 3\n bad indent: 1\n", "is not valid YAML: line 3"),
        ("a: " + "[" * 20000 + "]" * 20000 + "\n", "is not valid YAML"),
        (b"trainer:\n  max_steps: \xff\n", "is not UTF-8 text (byte 0xff on line 2); save it as UTF-8"),
        ("model:\n  optim: 5\n", "model.optim (5) must be a mapping of keys (model.optim.name"),
        ("model:\n  data: null\n", "model.data (null) must be a mapping of keys"),
    ],
    ids=["list", "string", "number", "invalid", "indent", "deep", "not-utf8", "scalar-section", "null-section"],
)  # fmt: skip
def test_recipe_that_is_not_a_mapping_of_keys(text: str | bytes, message: str, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    recipe = tmp_path / "recipe.yaml"
    recipe.write_bytes(text if isinstance(text, bytes) else text.encode())
    for command in (["config", "validate", "--offline"], ["train"]):
        code, _, err = _run(capsys, *command, str(recipe), f"exp_manager.exp_dir={tmp_path / 'runs'}")
        assert code == 2 and message in err and "Traceback" not in err, (command, err)
        assert err.count("\n") == 1 and ("recipe.yaml" in err or "must be a mapping" in err), err


def test_override_that_is_not_yaml(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run(capsys, "config", "validate", "--offline", "trainer.max_steps=[")
    assert code == 2 and "override 'trainer.max_steps=[' cannot be parsed: line 2, column 1" in err, err


@pytest.mark.parametrize(
    ("overrides", "key", "expected"),
    [
        (["trainer.max_steps=-1", "trainer.max_epochs=2"], "trainer.max_steps", -1),
        (["trainer.max_epochs=-1"], "trainer.max_epochs", -1),
        (["trainer.max_steps=1e3"], "trainer.max_steps", 1000),  # a whole number written as a float
        (["model.optim.lr='5e-4'"], "model.optim.lr", 5e-4),  # a number written as text
        (["exp_manager.checkpoint_every_n_steps=0"], "exp_manager.checkpoint_every_n_steps", 0),
        (["exp_manager.save_top_k=-1"], "exp_manager.save_top_k", -1),
        (["model.mm_cfg.llm.from_pretrained=''"], "model.mm_cfg.llm.from_pretrained", None),  # NeMo's unset path
        (["model.optim.betas=[0, 0.999]"], "model.optim.betas", [0.0, 0.999]),
    ],
)  # fmt: skip
def test_edge_values_are_accepted_as_their_type(overrides: list[str], key: str, expected: Any) -> None:
    value = OmegaConf.select(load_config(None, overrides), key)
    value = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
    assert value == expected and type(value) is type(expected), (value, expected)


def test_the_table_covers_every_key_of_the_base_config() -> None:
    """Every leaf of ``conf/neva_config.yaml`` has a rule or is named as checked elsewhere (with the reason)."""
    base = OmegaConf.load(BASE_CONFIG)
    leaves = {k for k, v in _leaves(OmegaConf.to_container(base, resolve=False))}
    assert set(VALUES) <= leaves, set(VALUES) - leaves  # no rule for a key that does not exist
    assert set(CHECKED_ELSEWHERE) <= leaves and not set(CHECKED_ELSEWHERE) & set(VALUES)
    assert leaves - set(VALUES) - set(CHECKED_ELSEWHERE) == set()
    for key, rule in VALUES.items():  # the base config's own values pass
        ok, _ = rule.check(OmegaConf.select(base, key))
        assert ok or key in ("exp_manager.exp_dir",), (key, OmegaConf.select(base, key))


def test_every_recipe_passes_the_value_checks() -> None:
    recipes = sorted((ROOT / "recipes").rglob("*.yaml"))
    assert len(recipes) > 10
    for recipe in recipes:
        load_config(recipe)  # raises NevaError naming the value


def test_rule_descriptions() -> None:
    assert Rule("int", low=1, extra=(-1,), hint="h").describe() == "an integer ≥ 1, or -1 (h)"
    assert Rule("float", low=0, above=True, high=1, null=True).describe() == "a number > 0 and ≤ 1, or null"
    assert Rule("choice", choices=("a", "b")).describe() == "one of a, b"


def test_cli_subprocess_one_line_no_traceback() -> None:
    """The real command: exit status 2 and one line on stderr."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "neva_tools", "config", "validate", "--offline",
                           "trainer.max_steps=abc"], capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == ["neva: error: trainer.max_steps (abc) must be an integer ≥ 1, or -1 (-1: from "
                                        "trainer.max_epochs)"]  # fmt: skip


# -- fuzz -------------------------------------------------------------------------------------------------------------


def _leaves(tree: Any, prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out += _leaves(value, f"{prefix}{key}.")
        else:
            out.append((f"{prefix}{key}", value))
    return out


KEYS = sorted(k for k, _ in _leaves(OmegaConf.to_container(OmegaConf.load(BASE_CONFIG), resolve=False)))
SECTIONS = sorted({k.rsplit(".", 1)[0] for k in KEYS if "." in k})
SCALARS = (st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=True, allow_infinity=True)
           | st.text(max_size=12) | st.sampled_from(["-1", "0", "1e3", "abc", "${trainer.max_steps}", "${nope}", "",
                                                     "\x00", "\udcff", "null", "[1, 2]"]))  # fmt: skip
VALUES_ST = st.recursive(
    SCALARS, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3), max_leaves=6
)


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    """Dotted keys as nested mappings; a key below one already set to a value replaces that value."""
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[leaf] = value
    return tree


def _exits_cleanly(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse: a value that looks like an option
        code = exc.code
    out, err = capsys.readouterr()
    assert code in (0, 1, 2), (code, argv, err)
    assert "Traceback" not in out + err, err


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.sampled_from(KEYS + SECTIONS), VALUES_ST, min_size=1, max_size=3))
def test_fuzz_mutated_recipe_values(tmp_path_factory: pytest.TempPathFactory, capsys: pytest.CaptureFixture[str],
                                    mutation: dict[str, Any]) -> None:  # fmt: skip
    recipe = tmp_path_factory.mktemp("fuzz") / "recipe.yaml"
    try:
        text = yaml.safe_dump(_nest(mutation), allow_unicode=False)
    except yaml.YAMLError:
        return
    recipe.write_text(text)
    _exits_cleanly(["config", "validate", "--offline", str(recipe)], capsys)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(KEYS), SCALARS)
def test_fuzz_command_line_overrides(capsys: pytest.CaptureFixture[str], key: str, value: Any) -> None:
    text = value if isinstance(value, str) else yaml.safe_dump(value, default_flow_style=True).strip()
    text = text.removesuffix("\n...").strip()
    if "\x00" in text or "\n" in text:
        return
    _exits_cleanly(["config", "validate", "--offline", f"{key}={text}"], capsys)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_fuzz_damaged_recipe_files(tmp_path_factory: pytest.TempPathFactory, capsys: pytest.CaptureFixture[str],
                                   data: st.DataObject) -> None:  # fmt: skip
    """A shipped recipe cut short, with bytes replaced or inserted: our error or a valid config, never a crash."""
    raw = bytearray(TINY.read_bytes())
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(raw)))
        action = data.draw(st.sampled_from(["cut", "replace", "insert"]))
        byte = data.draw(st.sampled_from(list(b":-[]{}\"'#&*!|>%@` \n\t\xff\x00ab1")))
        if action == "cut":
            del raw[at:]
        elif action == "replace" and at < len(raw):
            raw[at] = byte
        else:
            raw.insert(at, byte)
    recipe = tmp_path_factory.mktemp("damaged") / "recipe.yaml"
    recipe.write_bytes(bytes(raw))
    _exits_cleanly(["config", "validate", "--offline", str(recipe)], capsys)


def test_load_config_raises_our_error_for_a_list_recipe(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("[1, 2]\n")
    with pytest.raises(NevaError, match=r"r\.yaml must be a YAML mapping of keys"):
        load_config(recipe)
