"""Every ``TrainConfig`` field from the command line and from a config file; option flags; choices and plain text in ``--help``."""

from __future__ import annotations

import json
import typing
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, Dict, List

import pytest

from engm_opacus.cli import build_parser, main
from engm_opacus.cli.config_args import OPTION_FIELDS, config_from_args, flag
from engm_opacus.training.checkpoints import save_checkpoint
from engm_opacus.training.config import TrainConfig, field_choices
from engm_opacus.training.options import optional_inner

OPTION_VALUES: Dict[str, Dict[str, Any]] = {
    "at_options": {"beta": 3.0, "lam": 2.5, "gamma_awp": 0.01},
    "engm_options": {
        "on_nonfinite": "skip", "input_norm_scale": 2.0, "calibrate_every": 3, "calibration_momentum": 0.25,
        "input_grad_source": "attack", "attack_loss_reduction": "sum",
    },
}


def non_default(name: str, annotation: Any, default: Any, checkpoint: Path) -> Any:
    """A valid value of the field other than its default."""
    if name in OPTION_VALUES:
        return OPTION_VALUES[name]
    if name == "resume":
        return str(checkpoint)
    if name in field_choices():
        return next(c for c in field_choices()[name] if c != default)
    inner, _ = optional_inner(annotation)
    if inner is bool:
        return not default
    if inner is int:
        return (default or 4) + 3
    if inner is float:
        return 0.25
    return f"some/{name}"


def tokens(name: str, value: Any) -> List[str]:
    """The command-line words that set ``name`` to ``value``."""
    if name in OPTION_FIELDS:
        return [word for key, item in value.items() for word in (flag(key), str(item))]
    if isinstance(value, bool):
        return [flag(name) if value else "--no-" + name.replace("_", "-")]
    return [flag(name), str(value)]


@pytest.fixture(scope="module")
def expected(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Any]:
    """A non-default value for every field (``resume``: a real checkpoint holding the default config)."""
    checkpoint = save_checkpoint({"epoch": 1, "model": {}, "config": asdict(TrainConfig())}, tmp_path_factory.mktemp("ckpt") / "last.pt")
    hints = typing.get_type_hints(TrainConfig)
    defaults = asdict(TrainConfig())
    return {f.name: non_default(f.name, hints[f.name], defaults[f.name], checkpoint) for f in fields(TrainConfig)}


def parse(argv: List[str]) -> TrainConfig:
    return config_from_args(build_parser().parse_args(["train", *argv]))


def test_the_option_tables_cover_the_signatures() -> None:
    assert {k: set(v) for k, v in OPTION_VALUES.items()} == {k: set(list_options()) for k, list_options in OPTION_FIELDS.items()}


@pytest.mark.parametrize("name", [f.name for f in fields(TrainConfig)])
def test_every_field_is_a_flag(name: str, expected: Dict[str, Any]) -> None:
    config = asdict(parse(tokens(name, expected[name])))
    defaults = asdict(TrainConfig())
    assert config[name] == expected[name]
    assert {k: v for k, v in config.items() if k != name} == {k: v for k, v in defaults.items() if k != name}


@pytest.mark.parametrize("suffix", [".json", ".toml"])
def test_every_field_is_a_config_file_key(suffix: str, expected: Dict[str, Any], tmp_path: Path) -> None:
    path = tmp_path / f"config{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(expected))
    else:
        scalars = [f"{k.replace('_', '-')} = {json.dumps(v)}" for k, v in expected.items() if k not in OPTION_FIELDS]
        tables = [f"[{k}]\n" + "\n".join(f"{o} = {json.dumps(v)}" for o, v in expected[k].items()) for k in OPTION_FIELDS]
        path.write_text("\n".join(scalars) + "\n" + "\n".join(tables) + "\n")
    assert asdict(parse(["--config", str(path)])) == expected


def test_flags_override_the_file_which_overrides_the_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    checkpoint = save_checkpoint(
        {"epoch": 1, "model": {}, "config": asdict(TrainConfig(epochs=7, gamma=2.0, at_method="trades", at_options={"beta": 1.0}))},
        tmp_path / "last.pt",
    )
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"resume": str(checkpoint), "gamma": 3.0, "eps": "4/255", "at_options": {"beta": 2.0}}))
    config = parse(["--config", str(path), "--gamma", "5", "--batch-size", "8"])
    assert (config.epochs, config.gamma, config.batch_size, config.eps) == (7, 5.0, 8, 4 / 255)
    assert config.at_method == "trades" and config.at_options == {"beta": 2.0} and config.resume == str(checkpoint)
    assert main(["train", "--config", str(path), "--print-config"]) == 0
    printed = tmp_path / "printed.json"
    printed.write_text(capsys.readouterr().out)
    assert asdict(parse(["--config", str(printed)])) == asdict(parse(["--config", str(path)]))


@pytest.mark.parametrize(
    "content,message",
    [
        ('{"epochz": 3}', "unknown key 'epochz'"),
        ('{"epochs": "three"}', "epochs must be int"),
        ('{"at_options": 3}', "must be a table"),
        ("[1, 2]", "must hold an object"),
        ("{nope", "not valid JSON"),
    ],
)
def test_bad_config_files_exit_2(content: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content)
    assert main(["train", "--config", str(path)]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--beta", "3"], "at_options['beta'] applies to at_method trades, awp-trades, not 'pgd-at'"),
        (["--at-method", "mart", "--lam", "-1"], "lam must be >= 0"),
        (["--optimizer", "msgd", "--on-nonfinite", "skip"], "need an ENGM optimizer"),
        (["--calibrate-every", "3"], "applies to optimizer engm-input-norm, not 'engm'"),
    ],
)
def test_options_that_do_not_apply_exit_2(argv: List[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", *argv, "--out-dir", str(tmp_path / "run"), "--max-train-examples", "8"]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_option_flags_reach_the_run_config() -> None:
    config = parse(["--at-method", "awp-trades", "--beta", "3", "--gamma-awp", "1e-2", "--optimizer", "engm-input-norm",
                    "--input-norm-scale", "none", "--calibrate-every", "5", "--on-nonfinite", "skip", "--threads", "none"])
    assert config.at_options == {"beta": 3.0, "gamma_awp": 0.01} and config.threads is None
    assert config.engm_options == {"input_norm_scale": None, "calibrate_every": 5, "on_nonfinite": "skip"}
    assert config.validate().lr == 0.5


def help_text(command: str, capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    return capsys.readouterr().out


def test_train_help_lists_every_choice_and_option(capsys: pytest.CaptureFixture[str]) -> None:
    text = help_text("train", capsys)
    for name, choices in field_choices().items():
        assert "{" + ",".join(choices) + "}" in text, name
    assert "{raise,skip}" in text
    for flag_name in ("--beta", "--lam", "--gamma-awp", "--on-nonfinite", "--input-norm-scale", "--calibrate-every", "--no-progress"):
        assert flag_name in text
    assert "(default: 8/255)" in text


@pytest.mark.parametrize("command", ["train", "bench", "diagnose"])
def test_help_has_no_docstring_markup(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    text = help_text(command, capsys)
    assert ":func:" not in text and ":class:" not in text and ":mod:" not in text and "``" not in text


def test_the_quickstart_config_file_example_parses(tmp_path: Path) -> None:
    page = (Path(__file__).resolve().parents[2] / "docs" / "quickstart.md").read_text()
    toml = page.split("```toml\n", 1)[1].split("```", 1)[0]
    path = tmp_path / "trades.toml"
    path.write_text(toml)
    config = parse(["--config", str(path)])
    assert (config.at_method, config.optimizer, config.eps, config.epochs) == ("trades", "engm-input-norm", 8 / 255, 20)
    assert config.at_options == {"beta": 3.0} and config.engm_options == {"calibrate_every": 5}
    assert config.validate().lr == 0.5
