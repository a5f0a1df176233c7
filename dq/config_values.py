"""Typed reads of config values: a value of the wrong type or out of range is a UserError naming its key.

    num = config_int(cfg, "fidelity.num_samples", minimum=2)
    features = config_choice(cfg, "fidelity.features", ("auto", "digits", "inception", "none", None))

`cfg` is any mapping-like config (an OmegaConf DictConfig or a dict of dicts); `key` a dotted path.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

from dq.errors import UserError


def config_value(cfg: Any, key: str) -> Any:
    """The value at dotted `key`; UserError when it is absent or a `???` left unset."""
    node = cfg
    for part in key.split("."):
        try:
            node = node[part]
        except Exception as err:  # KeyError, omegaconf's ConfigKeyError / MissingMandatoryValue
            raise UserError(f"config key {key} is {'not set (???)' if _is_missing_mandatory(err) else 'missing'}"
                            ) from err
    return node


def _is_missing_mandatory(err: BaseException) -> bool:
    return type(err).__name__ == "MissingMandatoryValue"


def config_int(cfg: Any, key: str, *, minimum: int | None = None, maximum: int | None = None,
               optional: bool = False) -> int | None:
    value = config_value(cfg, key)
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise UserError(f"{key} must be an int{' or null' if optional else ''}{_range(minimum, maximum)}, got {value!r}")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise UserError(f"{key} must be an int{_range(minimum, maximum)}, got {value}")
    return value


def config_bool(cfg: Any, key: str) -> bool:
    value = config_value(cfg, key)
    if not isinstance(value, bool):
        raise UserError(f"{key} must be true or false, got {value!r}")
    return value


def config_choice(cfg: Any, key: str, choices: Iterable[Any]) -> Any:
    value = config_value(cfg, key)
    allowed = list(choices)
    if value not in allowed:
        raise UserError(f"{key} must be one of {allowed}, got {value!r}")
    return value


def config_str(cfg: Any, key: str, *, optional: bool = False) -> str | None:
    value = config_value(cfg, key)
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value:
        raise UserError(f"{key} must be a non-empty string{' or null' if optional else ''}, got {value!r}")
    return value


def _range(minimum: Any, maximum: Any) -> str:
    if minimum is not None and maximum is not None:
        return f" in [{minimum}, {maximum}]"
    if minimum is not None:
        return f" >= {minimum}"
    if maximum is not None:
        return f" <= {maximum}"
    return ""


def check_field_types(instance: Any, prefix: str = "") -> None:
    """UserError when a dataclass field declared int / float / bool / str holds another type (a config
    string where a number belongs, a bool where an int does). Optional fields may be None."""
    for field in dataclasses.fields(instance):
        value = getattr(instance, field.name)
        declared = str(field.type)
        if value is None and "None" in declared:
            continue
        name = f"{prefix}{field.name}"
        if declared.startswith("bool"):
            ok = isinstance(value, bool)
        elif declared.startswith("int"):
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif declared.startswith("float"):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        elif declared.startswith("str"):
            ok = isinstance(value, str)
        else:
            continue
        if not ok:
            raise UserError(f"{name} must be {declared.split(' ')[0]}, got {value!r}")


def known_fields(cls: type, mapping: Mapping[str, Any], what: str) -> dict[str, Any]:
    """`mapping` as keyword arguments of dataclass `cls`; UserError naming the keys it does not have
    ("unknown <what> [...]; known: [...]")."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(mapping) - names)
    if unknown:
        raise UserError(f"unknown {what} {unknown}; known: {sorted(names)}")
    return dict(mapping)
