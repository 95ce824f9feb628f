"""Command-line flags and config files derived from ``TrainConfig``'s fields: one flag per field, one key per field.

Each dataclass field ``name`` becomes ``--name-with-dashes`` in the group of its
``metadata["group"]`` with its ``metadata["help"]``: booleans as ``--x`` / ``--no-x``, names with
``choices=`` from :func:`engm_opacus.training.config.field_choices`, floats as
:func:`engm_opacus.cli.number` (``8/255`` works), ``Optional`` numbers also accept ``none``. The
dict fields ``at_options`` / ``engm_options`` become one flag per :class:`~engm_opacus.training.options.Option`
(``--beta``, ``--lam``, ``--gamma-awp``, ``--on-nonfinite``, ...). ``--config FILE`` reads the same
keys from JSON or TOML (``at_options`` / ``engm_options`` as nested tables); flags override
the file, the file overrides the ``--resume`` checkpoint's config, which overrides the defaults.
"""

from __future__ import annotations

import argparse
import json
import typing
from dataclasses import asdict, fields
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Dict, Optional

from engm_opacus.cli import number
from engm_opacus.training.checkpoints import load_checkpoint
from engm_opacus.training.config import GROUPS, TrainConfig, config_from_payload, field_choices, format_eps
from engm_opacus.training.options import Option, at_loss_options, engm_options, literal_choices, optional_inner, value_matches

OPTION_FIELDS: Dict[str, Callable[[], Dict[str, Option]]] = {"at_options": at_loss_options, "engm_options": engm_options}
"""Dict-valued fields and the function listing their typed keys."""
SEPARATOR = "."
"""``dest`` of an option flag: ``at_options.beta``."""


def flag(name: str) -> str:
    """``max_train_examples`` -> ``--max-train-examples``."""
    return "--" + name.replace("_", "-")


THREAT_MODEL_FIELDS = ("eps", "step_size")
"""Fields whose defaults ``--help`` shows as ``k/255``."""
METAVARS = {"resume": "CHECKPOINT", "out_dir": "DIR", "data_dir": "DIR"}


def _shown(name: str, value: Any) -> str:
    if value is None:
        return "none"
    if name in THREAT_MODEL_FIELDS:
        return format_eps(value)
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def _scalar_parser(annotation: Any) -> Optional[Callable[[str], Any]]:
    """argparse ``type=`` for a field or option type; ``Optional`` numbers also take ``none``."""
    inner, optional = optional_inner(annotation)
    base: Optional[Callable[[str], Any]] = {float: number, int: int, str: str}.get(inner)
    if base is None or not optional or inner is str:
        return base

    def parse(text: str) -> Any:
        return None if text.strip().lower() == "none" else base(text)

    parse.__name__ = getattr(base, "__name__", "value")  # argparse names the type in its errors
    return parse


def _add(group: argparse._ActionsContainer, name: str, dest: str, annotation: Any, help_text: str, default: Any, choices: Any) -> None:
    help_text = f"{help_text} (default: {_shown(name, default)})".replace("%", "%%")  # argparse formats help with %
    if optional_inner(annotation)[0] is bool:
        group.add_argument(flag(name), dest=dest, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
        return
    group.add_argument(
        flag(name), dest=dest, type=_scalar_parser(annotation), choices=choices, default=argparse.SUPPRESS, help=help_text,
        metavar=None if choices else METAVARS.get(name, (name if SEPARATOR in dest else name.split("_")[-1]).upper()),
    )


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--config`` and one flag per ``TrainConfig`` field (and per AT / ENGM option) to ``parser``."""
    parser.add_argument("--config", metavar="FILE", help="JSON or TOML file with TrainConfig keys (flags override it)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as JSON (a --config file) and exit")
    hints = typing.get_type_hints(TrainConfig)
    defaults = TrainConfig()
    choices = field_choices()
    groups = {name: parser.add_argument_group(name) for name in GROUPS}
    for f in fields(TrainConfig):
        group = groups[f.metadata["group"]]
        if f.name in OPTION_FIELDS:
            for option in OPTION_FIELDS[f.name]().values():
                applies = ", ".join(option.applies_to)
                _add(group, option.name, f.name + SEPARATOR + option.name, option.type, f"{option.help} [{f.name}; {applies}]",
                     option.default, literal_choices(option.type))
            continue
        _add(group, f.name, f.name, hints[f.name], f.metadata["help"], getattr(defaults, f.name), choices.get(f.name))


def given_values(args: argparse.Namespace) -> Dict[str, Any]:
    """The ``TrainConfig`` values given as flags: ``{field: value}``, option flags nested under their dict field."""
    names = {f.name for f in fields(TrainConfig)}
    given: Dict[str, Any] = {}
    for dest, value in vars(args).items():
        owner, _, key = dest.partition(SEPARATOR)
        if key and owner in OPTION_FIELDS:
            given.setdefault(owner, {})[key] = value
        elif dest in names and dest not in OPTION_FIELDS:
            given[dest] = value
    return given


def _coerce(name: str, annotation: Any, value: Any, source: str) -> Any:
    inner, _ = optional_inner(annotation)
    if inner is float and isinstance(value, str):
        try:
            value = float(Fraction(value.strip()))
        except (ValueError, ZeroDivisionError):
            pass
    if not value_matches(annotation, value):
        raise ValueError(f"{source}: {name} must be {getattr(inner, '__name__', inner)}, got {value!r}.")
    return float(value) if inner is float and value is not None else value


def read_config_file(path: str) -> Dict[str, Any]:
    """The ``TrainConfig`` keys in a JSON or TOML file (``.toml``), dashes read as underscores, types checked.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not JSON / TOML, an unknown key (the message lists the known ones), or a wrong type.
    """
    source = Path(path)
    if not source.is_file():
        raise FileNotFoundError(
            f"Config file {source} does not exist. Fix: pass a JSON or TOML file (engm-opacus train --print-config writes one)."
        )
    text = source.read_text(encoding="utf-8")
    is_toml = source.suffix.lower() == ".toml"
    if is_toml:
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            raise ValueError(f"Reading {source} needs Python >= 3.11 (tomllib). Fix: write the config as JSON.") from None
    try:
        data = tomllib.loads(text) if is_toml else json.loads(text)
    except ValueError as error:  # json.JSONDecodeError and tomllib.TOMLDecodeError are ValueErrors
        raise ValueError(f"Config file {source} is not valid {'TOML' if is_toml else 'JSON'}: {error}") from None
    if not isinstance(data, dict):
        raise ValueError(f"Config file {source} must hold an object of TrainConfig keys, got {type(data).__name__}.")
    hints = typing.get_type_hints(TrainConfig)
    out: Dict[str, Any] = {}
    for raw_key, value in data.items():
        key = raw_key.replace("-", "_")
        if key not in hints:
            raise ValueError(f"Config file {source}: unknown key {raw_key!r}. Fix: use TrainConfig keys: {', '.join(hints)}.")
        if key in OPTION_FIELDS:
            if not isinstance(value, dict):
                raise ValueError(f"Config file {source}: {key} must be a table / object, got {value!r}.")
            specs = OPTION_FIELDS[key]()
            value = {k.replace("-", "_"): v for k, v in value.items()}
            value = {k: _coerce(f"{key}.{k}", specs[k].type, v, str(source)) if k in specs else v for k, v in value.items()}
        else:
            value = _coerce(key, hints[key], value, str(source))
        out[key] = value
    return out


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Defaults <- the ``--resume`` checkpoint's config <- ``--config`` file <- flags, as a ``TrainConfig``."""
    given = given_values(args)
    from_file = read_config_file(args.config) if getattr(args, "config", None) else {}
    resume = given.get("resume", from_file.get("resume"))
    base = config_from_payload(load_checkpoint(resume)) if resume is not None else TrainConfig()
    values = asdict(base)
    for layer in (from_file, given):
        for key, value in layer.items():
            values[key] = {**values[key], **value} if key in OPTION_FIELDS else value
    return TrainConfig(**values)


def config_to_json(config: TrainConfig) -> str:
    """``config`` as a JSON object that ``--config`` reads back to the same config."""
    return json.dumps(asdict(config), indent=2)

