"""The typed keyword options behind ``TrainConfig.at_options`` / ``engm_options``, read from the AT losses' and ``make_engm``'s signatures.

An :class:`Option` is one keyword argument (name, type, default, the AT methods or optimizers it
applies to, and its help from the docstring's ``Args:`` section). :func:`at_loss_options` lists
the keyword-only arguments of each AT loss beyond the attack's (TRADES ``beta``, MART ``lam``,
AWP ``gamma_awp``); :func:`engm_options` lists :func:`engm_opacus.make_engm`'s beyond ``gamma``,
``variant`` (chosen by ``TrainConfig.optimizer``) and ``loss_reduction`` (the AT losses are
mean-reduced). A new keyword in those signatures becomes a config key and a command-line flag
without further code.
"""

from __future__ import annotations

import inspect
import re
import typing
from dataclasses import dataclass
from typing import Any, Callable, Dict, Literal, Optional, Tuple, Union

from engm_opacus.at.losses import AT_METHODS, AWP, AWP_INNER_METHODS, AWP_PREFIX
from engm_opacus.at.losses.base import AttackThenLoss
from engm_opacus.wrap import make_engm

ENGM_OPTIMIZERS: Tuple[str, ...] = ("engm", "engm-input-norm")
INPUT_NORM_ONLY = "input-norm only:"
"""The docstring marker of ``make_engm`` arguments that apply to ``variant="input-norm"`` only."""
NOT_OPTIONS = {"gamma", "variant", "loss_reduction"}
"""``make_engm`` arguments set otherwise: ``TrainConfig.gamma``, ``TrainConfig.optimizer``, the AT losses' mean."""


@dataclass(frozen=True)
class Option:
    """One keyword argument of an AT loss or of ``make_engm``.

    Attributes:
        name: the keyword (also the config key; the command-line flag is ``--name`` with dashes).
        owner: ``"at_options"`` or ``"engm_options"``: the ``TrainConfig`` dict that holds it.
        type: the resolved annotation (``float``, ``int``, ``Optional[float]``, ``Literal[...]``).
        default: the signature's default.
        applies_to: the AT methods (``at_options``) or optimizers (``engm_options``) that take it.
        help: the docstring's description, as plain text.
    """

    name: str
    owner: str
    type: Any
    default: Any
    applies_to: Tuple[str, ...]
    help: str

    @property
    def choices(self) -> Optional[Tuple[Any, ...]]:
        """The values of a ``Literal`` type, else ``None``."""
        return literal_choices(self.type)

    def check(self, value: Any) -> None:
        """Raise ``ValueError`` if ``value`` does not have this option's type."""
        if not value_matches(self.type, value):
            expected = f"one of {', '.join(map(str, self.choices))}" if self.choices else type_name(self.type)
            raise ValueError(f"{self.owner}[{self.name!r}] must be {expected}, got {value!r}.")


def plain_text(text: str) -> str:
    """Docstring markup as plain text: ``:func:`~a.b.c``` -> ``c``, ``:class:`a.b``` -> ``a.b``, double backticks removed."""
    text = re.sub(r":[a-z]+:`~(?:[\w.]+\.)?([\w]+)`", r"\1", text)
    text = re.sub(r":[a-z]+:`([^`]+)`", r"\1", text)
    return text.replace("``", "")


def literal_choices(annotation: Any) -> Optional[Tuple[Any, ...]]:
    """The values of ``Literal[...]`` (also inside ``Optional``), else ``None``."""
    if typing.get_origin(annotation) is Literal:
        return typing.get_args(annotation)
    if typing.get_origin(annotation) is Union:
        for arg in typing.get_args(annotation):
            if typing.get_origin(arg) is Literal:
                return typing.get_args(arg)
    return None


def optional_inner(annotation: Any) -> Tuple[Any, bool]:
    """``(X, True)`` for ``Optional[X]``, else ``(annotation, False)``."""
    if typing.get_origin(annotation) is Union and type(None) in typing.get_args(annotation):
        rest = [a for a in typing.get_args(annotation) if a is not type(None)]
        return (rest[0] if len(rest) == 1 else Union[tuple(rest)]), True
    return annotation, False


def type_name(annotation: Any) -> str:
    """``float``, ``int``, ``str``, ``bool``, ``float or None``."""
    inner, optional = optional_inner(annotation)
    name = "a number" if inner is float else getattr(inner, "__name__", str(inner))
    return f"{name} or None" if optional else name


def value_matches(annotation: Any, value: Any) -> bool:
    """Whether ``value`` has type ``annotation`` (``float`` accepts ints; ``bool`` is not a number)."""
    inner, optional = optional_inner(annotation)
    if value is None:
        return optional
    choices = literal_choices(inner)
    if choices is not None:
        return value in choices
    if inner is bool:
        return isinstance(value, bool)
    if inner is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if inner is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if inner is str:
        return isinstance(value, str)
    return True


def docstring_args(obj: Callable[..., Any]) -> Dict[str, str]:
    """``{name: description}`` of a google-style docstring's ``Args:`` section (plain text, one line)."""
    doc = inspect.getdoc(obj) or ""
    section = re.search(r"^Args:\n((?:[ \t]+.*\n?|\n)+)", doc, re.MULTILINE)
    if section is None:
        return {}
    entries: Dict[str, str] = {}
    current = None
    for line in section.group(1).splitlines():
        match = re.match(r"^ {4}\**(\w+)(?: \([^)]*\))?: ?(.*)$", line)
        if match:
            current = match.group(1)
            entries[current] = match.group(2).strip()
        elif current is not None and line.strip():
            entries[current] += " " + line.strip()
    return {name: plain_text(text) for name, text in entries.items()}


def _keyword_options(function: Callable[..., Any], owner: str, applies_to: Tuple[str, ...], skip: set) -> Dict[str, Option]:
    hints = typing.get_type_hints(function)
    docs = docstring_args(function)
    out: Dict[str, Option] = {}
    for parameter in inspect.signature(function).parameters.values():
        if parameter.kind is not inspect.Parameter.KEYWORD_ONLY or parameter.name in skip:
            continue
        out[parameter.name] = Option(
            parameter.name, owner, hints.get(parameter.name, Any), parameter.default, applies_to, docs.get(parameter.name, "")
        )
    return out


def _merge(into: Dict[str, Option], new: Dict[str, Option]) -> None:
    for name, option in new.items():
        if name in into:
            known = into[name]
            if (known.type, known.default) != (option.type, option.default):
                raise TypeError(f"Option {name!r} has different types or defaults in {known.applies_to} and {option.applies_to}.")
            option = Option(name, known.owner, known.type, known.default, known.applies_to + option.applies_to, known.help or option.help)
        into[name] = option


def at_loss_options() -> Dict[str, Option]:
    """The ``at_options`` keys: keyword-only arguments of each AT loss beyond the attack's (``eps``, ``steps``, ...)."""
    attack_arguments = set(inspect.signature(AttackThenLoss.__init__).parameters)
    options: Dict[str, Option] = {}
    for name, cls in AT_METHODS.items():
        applies = (name,) + ((AWP_PREFIX + name,) if name in AWP_INNER_METHODS else ())
        found = _keyword_options(cls.__init__, "at_options", applies, attack_arguments)
        docs = docstring_args(cls)
        _merge(options, {k: Option(k, o.owner, o.type, o.default, o.applies_to, docs.get(k, o.help)) for k, o in found.items()})
    awp = _keyword_options(AWP.__init__, "at_options", tuple(AWP_PREFIX + n for n in AWP_INNER_METHODS), {"inner"})
    docs = docstring_args(AWP)
    _merge(options, {k: Option(k, o.owner, o.type, o.default, o.applies_to, docs.get(k, o.help)) for k, o in awp.items()})
    return options


def engm_options() -> Dict[str, Option]:
    """The ``engm_options`` keys: keyword-only arguments of ``make_engm`` but ``gamma``, ``variant``, ``loss_reduction``."""
    options = _keyword_options(make_engm, "engm_options", ENGM_OPTIMIZERS, NOT_OPTIONS)
    for name, option in options.items():
        if option.help.startswith(INPUT_NORM_ONLY):
            options[name] = Option(
                name, option.owner, option.type, option.default, ("engm-input-norm",), option.help[len(INPUT_NORM_ONLY):].strip()
            )
    return options


def check_options(owner: str, given: Dict[str, Any], selector: str, selector_field: str) -> None:
    """Raise ``ValueError`` for a key of ``given`` that is unknown, of the wrong type, or not for ``selector``.

    Args:
        owner: ``"at_options"`` or ``"engm_options"``.
        given: the dict in the config.
        selector: the config's ``at_method`` or ``optimizer``.
        selector_field: ``"at_method"`` or ``"optimizer"`` (for the message).
    """
    specs = at_loss_options() if owner == "at_options" else engm_options()
    if not isinstance(given, dict):
        raise ValueError(f"{owner} must be a dict, got {given!r}.")
    for key, value in given.items():
        if owner == "engm_options" and key == "variant":
            raise ValueError("engm_options cannot set 'variant'. Fix: choose it with optimizer='engm' or 'engm-input-norm'.")
        if key not in specs:
            raise ValueError(f"Unknown {owner} key {key!r}. Fix: use one of {', '.join(specs)}.")
        spec = specs[key]
        if selector not in spec.applies_to:
            raise ValueError(
                f"{owner}[{key!r}] applies to {selector_field} {', '.join(spec.applies_to)}, not {selector!r}. "
                f"Fix: drop it, or use {selector_field} {spec.applies_to[0]!r}."
            )
        spec.check(value)
