"""Typed run configs: dataclasses, YAML recipes, and dotted command-line overrides.

A recipe is a YAML file whose keys are exactly a command's config fields (nested
dataclasses become nested mappings). Any field can be overridden on the command line
as `--field value` or `--section.field value`. Every value is checked against the
field's type, and a wrong one produces a `ConfigError` naming the field, never a
traceback. The resolved config is written back to the run directory as YAML.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from graftlm.errors import ConfigError, read_yaml


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """`X | None` -> (X, True); anything else -> (tp, False)."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _type_name(tp: Any) -> str:
    tp, optional = _unwrap_optional(tp)
    if get_origin(tp) is Literal:
        name = "one of " + ", ".join(repr(a) for a in get_args(tp))
    elif get_origin(tp) is list:
        name = f"a list of {_type_name(get_args(tp)[0])}"
    elif get_origin(tp) in (Union, types.UnionType):
        name = " or ".join(_type_name(a) for a in get_args(tp))
    elif tp is float:
        name = "a number"
    elif tp is int:
        name = "an integer"
    elif tp is bool:
        name = "true or false"
    elif tp is str:
        name = "a string"
    else:
        name = getattr(tp, "__name__", str(tp))
    return name + (" or null" if optional else "")


_NAME = re.compile(r"[\w.-]+")


def _split_names(text: str) -> list[str]:
    """One string given for a list field (a command-line word, or a YAML string):
    comma-separated names (`lm_head,embed_tokens`) are that list. Anything else stays
    one entry, so that a regex with a `{1,2}` quantifier is not cut at its comma."""
    pieces = [p.strip() for p in text.split(",") if p.strip()]
    return pieces if all(_NAME.fullmatch(p) for p in pieces) else [text]


def coerce(value: Any, tp: Any, field: str) -> Any:
    """Convert `value` (from YAML or the command line) to type `tp`, or raise ConfigError."""
    inner, optional = _unwrap_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if optional:
            return None
        raise ConfigError(f"config field '{field}': expected {_type_name(tp)}, got null")
    origin = get_origin(inner)
    bad = ConfigError(f"config field '{field}': expected {_type_name(tp)}, got {value!r}")
    if origin in (Union, types.UnionType):  # `bool | Literal[...]`: the first alternative that takes it
        for alternative in get_args(inner):
            try:
                return coerce(value, alternative, field)
            except ConfigError:
                continue
        raise bad
    if origin is Literal:
        choices = get_args(inner)
        if value in choices:
            return value
        raise bad
    if origin is list:
        (item_tp,) = get_args(inner)
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise bad
        value = [piece for v in value for piece in (_split_names(v) if isinstance(v, str) else [v])]
        return [coerce(v, item_tp, f"{field}[{i}]") for i, v in enumerate(value)]
    if origin is dict or inner is dict:
        if isinstance(value, dict):
            return dict(value)
        raise bad
    if inner is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "no", "0", "off"):
            return False
        raise bad
    if inner is int:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                number = float(value.replace("_", ""))
            except ValueError:
                raise bad from None
            if number.is_integer():
                return int(number)
        raise bad
    if inner is float:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise bad from None
        raise bad
    if inner is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad
    if dataclasses.is_dataclass(inner):
        if isinstance(value, inner):
            return value
        if not isinstance(value, dict):
            raise bad
        return from_dict(inner, value, prefix=field + ".")
    return value


def _default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


def _section_base(f: dataclasses.Field, base: Any, inner: type) -> Any:
    """The default instance of section `f` (of type `inner`): `base`'s (the enclosing
    section's default) where there is one, else what the field's default_factory makes."""
    section = getattr(base, f.name) if base is not None else _default(f)
    return section if isinstance(section, inner) else None


def _inherited(cls: type, base: Any) -> dict:
    """The fields where `base`, a default instance of `cls` made by its parent's
    default_factory (PPO's `SamplingConfig(group_size=1)`), differs from `cls`'s own
    defaults: those a section given in part takes from `base`. Compared with `cls()`
    rather than the field defaults, so that a value its __post_init__ makes concrete
    (dpo.beta) is computed anew from what is given."""
    if base is None:
        return {}
    try:
        plain = cls()
    except TypeError:  # required fields: every field comes from `base`
        plain = None
    return {f.name: getattr(base, f.name) for f in dataclasses.fields(cls)
            if f.init and (plain is None or getattr(base, f.name) != getattr(plain, f.name))}


def from_dict(cls: type, data: dict, prefix: str = "", base: Any = None) -> Any:
    """Build dataclass `cls` from a (possibly nested) mapping, checking every field.
    base: the instance of `cls` that its parent's field defaults to, if any; the fields
    `data` leaves out take its values."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        close = difflib.get_close_matches(unknown[0], list(fields), n=1)
        hint = f"did you mean '{prefix}{close[0]}'? " if close else ""
        raise ConfigError(f"unknown config field '{prefix}{unknown[0]}' ({hint}known: {', '.join(sorted(fields))})")
    kwargs = {}
    for name, value in data.items():
        inner, _ = _unwrap_optional(hints[name])
        if dataclasses.is_dataclass(inner) and isinstance(value, dict):
            # A section given in part keeps the rest of the parent's default for it, not
            # its class's: `--ppo.sampling.temperature 1` leaves PPO's group_size at 1.
            kwargs[name] = from_dict(inner, value, f"{prefix}{name}.", _section_base(fields[name], base, inner))
        else:
            kwargs[name] = coerce(value, hints[name], prefix + name)
    kwargs = {**{name: copy.deepcopy(value) for name, value in _inherited(cls, base).items()}, **kwargs}
    missing = [
        name for name, f in fields.items()
        if name not in kwargs and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"config field '{prefix}{missing[0]}' is required")
    instance = cls(**kwargs)
    # A section left at its defaults is checked too: it may require a field (ppo.reward).
    for name in fields.keys() - data.keys():
        if dataclasses.is_dataclass(getattr(instance, name)):
            _validate(getattr(instance, name), f"{prefix}{name}.")
    _validate(instance, prefix)
    return instance


def _validate(instance: Any, prefix: str) -> None:
    validate = getattr(instance, "validate", None)
    if validate is not None:
        try:
            validate()
        except ConfigError as e:
            raise ConfigError(_qualified(str(e), prefix, {f.name for f in dataclasses.fields(instance)})) from None


def _qualified(message: str, prefix: str, names) -> str:
    """A section's validator names its own fields ('val_fraction'); the user set them
    under the section's path ('sft.val_fraction'), so that is what the error names."""
    if not prefix:
        return message
    return re.sub(r"'([A-Za-z_][\w.]*)'",
                  lambda m: f"'{prefix}{m[1]}'" if m[1].split(".")[0] in names else m[0], message)


def to_dict(instance: Any) -> dict:
    return dataclasses.asdict(instance)


def _set_dotted(target: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = target.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"config field '{dotted}': '{part}' is not a section")
        target = node
    target[parts[-1]] = value


def read_recipe(path: str | Path) -> dict:
    path = Path(path)
    data = read_yaml(path, ConfigError) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of config fields")
    return data


def build_config(cls: type, recipe: str | Path | dict | None = None,
                 overrides: dict[str, Any] | None = None) -> Any:
    """Recipe values first (a YAML file, or the mapping `read_recipe` made of it), then
    command-line overrides (dotted keys), then type checks."""
    data = copy.deepcopy(recipe) if isinstance(recipe, dict) else read_recipe(recipe) if recipe else {}
    for key, value in (overrides or {}).items():
        _set_dotted(data, key, value)
    return from_dict(cls, data)


def flatten(data: dict, prefix: str = "") -> dict:
    """A nested mapping (a config) as dotted keys: {"optim": {"lr": 1}} -> {"optim.lr": 1}."""
    out = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def under_given(instance: Any, recorded: dict, given) -> Any:
    """`instance` with each field the user did not give taken from `recorded` instead.

    recorded: a flattened config of the same class (what a run wrote to config.yaml);
    given: the dotted fields typed on the command line or set in a recipe. A field is
    given when it, a section holding it, or a field inside it was (`--adapter full`
    gives the whole `adapter` section). Recorded fields this class no longer has, or
    nulls where it no longer takes one, are left out."""
    given = list(given)
    types = {name: tp for name, tp, _, _ in _walk_fields(type(instance))}

    def touches(key: str, names) -> bool:
        return any(key == n or key.startswith(n + ".") or n.startswith(key + ".") for n in names)

    def outdated(key: str, value) -> bool:
        """A null recorded for a field that no longer takes one: its default has since become
        concrete (train.compile_activation_budget), and the run takes that."""
        return value is None and key in types and not _unwrap_optional(types[key])[1]

    kept = {k: v for k, v in recorded.items()
            if touches(k, types) and not touches(k, given) and not outdated(k, v)}
    data: dict = {}
    for key, value in flatten(to_dict(instance)).items():
        if touches(key, given) or not touches(key, kept):
            _set_dotted(data, key, value)
    for key, value in kept.items():
        _set_dotted(data, key, value)
    return from_dict(type(instance), data)


def as_read_now(instance: Any, recorded: dict) -> dict:
    """`recorded` (a flattened config of `instance`'s class) with each value as this graftlm
    reads it, a synonym in the spelling it records (grpo.scale_rewards: group -> true), so
    that a run recorded before sees no change where there is none. Fields this class no
    longer reads, and nulls `under_given` leaves out, stay as recorded; so does all of it
    where it no longer reads as a whole (the resume names what is wrong)."""
    try:
        now = flatten(to_dict(under_given(instance, recorded, [])))
    except ConfigError:
        return recorded
    types = {name: tp for name, tp, _, _ in _walk_fields(type(instance))}

    def read(key: str, value) -> bool:
        return key in now and (value is not None or key not in types or _unwrap_optional(types[key])[1])

    return {key: now[key] if read(key, value) else value for key, value in recorded.items()}


def save_config(instance: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(instance), sort_keys=False))


def _walk_fields(cls: type, prefix: str = "", base: Any = None):
    """(dotted name, type, field, default) of each field, sections walked into; the
    default is the one `from_dict` gives it (PPO's sampling.group_size: 1, not 4)."""
    hints = typing.get_type_hints(cls)
    inherited = _inherited(cls, base)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        inner, _ = _unwrap_optional(hints[f.name])
        if dataclasses.is_dataclass(inner):
            yield from _walk_fields(inner, prefix + f.name + ".", _section_base(f, base, inner))
        else:
            yield prefix + f.name, hints[f.name], f, inherited[f.name] if f.name in inherited else _default(f)


def add_config_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add `--recipe` and one `--dotted.field` option per config field.

    Options default to "not given" so that only what the user typed overrides the
    recipe; types are checked later by `build_config` so errors name the field.
    """
    parser.add_argument("--recipe", help="YAML file of config fields (command-line values win)")
    for dotted, tp, f, default in _walk_fields(cls):
        help_text = f.metadata.get("help", "")
        kind = _type_name(tp)
        flag = "--" + dotted.replace("_", "-")
        names = [flag] if flag == "--" + dotted else [flag, "--" + dotted]
        inner, _ = _unwrap_optional(tp)
        nargs = "+" if get_origin(inner) is list else None
        parser.add_argument(*names, dest="cfg:" + dotted, default=argparse.SUPPRESS, nargs=nargs,
                            metavar=dotted.split(".")[-1].upper(),
                            help=f"{help_text} ({kind}; default: {default})".strip())


def config_from_args(cls: type, args: argparse.Namespace) -> Any:
    overrides = {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg:")}
    return build_config(cls, getattr(args, "recipe", None), overrides)
