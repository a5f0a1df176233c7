"""The evaluate.py overrides that `run=` or `export=` makes meaningless, refused before any work.

    refuse_ignored_overrides(["run=DIR", "model.sampler.num_steps=13"])
    # UserError: model.sampler.num_steps=13 does nothing with run=: ... use sampler.num_steps=13 instead

A run dir brings its own model and sampler (its config.yaml) and an export the model it was exported from, so
an override of the `model` group or of any `model.*` key, or of `method.*` / `quant.*` (replaced by the run's
or export's own names), would be dropped silently and the evaluation would run what was not asked for. The
sampler has its own keys that do apply to a run (`sampler.*`, put over the run's sampler); the error names
them. `int_backend` and `int_compile` choose how an export runs and mean nothing without `export=`.

The check reads the command line's overrides (Hydra's task overrides), not the composed config: a value equal
to the default is still the user's explicit choice, and the composed config cannot tell the two apart.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from dq.errors import UserError
from dq.sampling import SamplerConfig

# evaluate.yaml's sampler keys (null = the run's own); the other SamplerConfig fields are added with `+`
EVAL_SAMPLER_KEYS = ("name", "num_steps", "spacing", "eta")
REPLACED = ("method", "quant")  # a run's / an export's own names replace evaluate.yaml's (logger names, tables)


def override_key(override: str) -> str:
    """The dotted key of a Hydra override: `model.path=/x`, `+model.dtype=f16`, `~model.cache_dir` → the key."""
    key = override.split("=", 1)[0].strip()
    return key.lstrip("+~")


def _given(overrides: Iterable[str], key: str) -> str | None:
    """The value of `key=value` among the overrides (the last one wins, as in Hydra), or None."""
    value = None
    for override in overrides:
        if override_key(override) == key and "=" in override:
            value = override.split("=", 1)[1]
    return None if value in (None, "null") else value


def refuse_ignored_overrides(overrides: Iterable[str]) -> None:
    """UserError, in one line naming the key to use instead, for the first override that the overrides'
    `run=` or `export=` makes meaningless (and for `int_backend` / `int_compile` without `export=`); nothing otherwise."""
    overrides = list(overrides)
    source = "export=" if _given(overrides, "export") else "run=" if _given(overrides, "run") else None
    for override in overrides:
        key = override_key(override)
        if key in ("int_backend", "int_compile") and source != "export=":
            raise UserError(f"{override} does nothing without export=: it chooses how an integer export runs "
                            "(export=<run dir>/student_int.safetensors); drop it")
        if source is None:
            continue
        head = key.split(".", 1)[0]
        if head == "model":
            raise UserError(_model_message(override, key, source))
        if head in REPLACED:
            raise UserError(f"{override} does nothing with {source}: the {'run' if source == 'run=' else 'export'} "
                            f"brings its own {head} (its name in metrics.json and the logger); drop it")


def _model_message(override: str, key: str, source: str) -> str:
    brings = ("a run dir brings its own model and sampler (the model section of <run>/config.yaml)"
              if source == "run=" else "an export brings the model it was exported from (recorded in the export)")
    parts = key.split(".")
    if len(parts) == 3 and parts[1] == "sampler":
        field = parts[2]
        fields = {f.name for f in dataclasses.fields(SamplerConfig)}
        if field in fields:
            value = override.split("=", 1)[1] if "=" in override else "..."
            instead = f"sampler.{field}={value}" if field in EVAL_SAMPLER_KEYS else f"+sampler.{field}={value}"
            policy = ("; off the trained schedule add tpq_policy=nearest or tpq_policy=interpolate"
                      if field in ("name", "num_steps", "spacing") else "")
            return f"{override} does nothing with {source}: {brings}; use {instead} instead{policy}"
    target = "model" if key == "model" else key
    return (f"{override} does nothing with {source}: {brings}, so {target} cannot change it; drop it (to "
            f"evaluate another model, leave out {source} and give its model= / model.* overrides)")
