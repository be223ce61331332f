"""Filling the config: defaults, then a TOML recipe, then the command line (in that order
of increasing precedence), each value checked against its field as it is set.

    python train.py --job.config_file train_configs/debug_model.toml --training.steps 20

Unknown sections or keys, wrong types and values a field does not allow raise
`ConfigError`, whose message is one line naming the key, the value and what is allowed.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import json
import sys
import textwrap
import types
import typing
from pathlib import Path
from typing import Any

from titan.config.sections import UNIMPLEMENTED, JobConfig, Rule
from titan.files import listing

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib


class ConfigError(ValueError):
    """A user error in the recipe or the command line; its message is one line."""


# ----------------------------------------------------------------------------- schema

SECTIONS: dict[str, type] = {f.name: f.default_factory for f in dataclasses.fields(JobConfig)}


def _field_types(cls: type) -> dict[str, Any]:
    """Field name -> annotated type (Literal and Annotated kept)."""
    return typing.get_type_hints(cls, include_extras=True)


def _base(tp: Any) -> Any:
    """The type under `Annotated[...]`."""
    return typing.get_args(tp)[0] if typing.get_origin(tp) is typing.Annotated else tp


def _field_docs(cls: type) -> dict[str, str]:
    """The string literal under each field of a dataclass (its attribute docstring)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:], strict=False):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _type_name(tp: Any) -> str:
    if tp in (int, float, str, bool):
        return tp.__name__
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        return _type_name(_base(tp))
    if origin is typing.Literal:
        return "one of " + "/".join(str(a) for a in typing.get_args(tp))
    if origin is list:
        return "list of " + _type_name(typing.get_args(tp)[0])
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _type_name(args[0]) + " or none"
    return str(tp)


def _suggest(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _coerce(key: str, value: Any, tp: Any, from_cli: bool) -> Any:
    """Check (TOML) or convert (command line) one value to its field's type, and check it
    against what the field allows (Literal choices, Annotated rules)."""
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        base, *rules = typing.get_args(tp)
        value = _coerce(key, value, base, from_cli)
        for rule in rules:
            if isinstance(rule, Rule) and not rule.ok(value):
                raise ConfigError(f"{key} = {value!r}: must be {rule.allowed}")
        return value
    if origin is typing.Literal:
        allowed = [str(a) for a in typing.get_args(tp)]
        if value not in allowed:
            raise ConfigError(
                f"{key} = {value!r}: must be one of {', '.join(allowed)}"
                f"{_suggest(str(value), allowed)}"
            )
        return value
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)][0]
        if value is None or (from_cli and str(value).lower() in ("none", "")):
            return None
        return _coerce(key, value, inner, from_cli)
    if origin is list:
        (inner,) = typing.get_args(tp)
        if from_cli and isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, list):
            raise ConfigError(f"{key} = {value!r}: expected a list of {_type_name(inner)}")
        return [_coerce(key, v, inner, from_cli) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if from_cli and str(value).lower() in ("true", "1", "yes"):
            return True
        if from_cli and str(value).lower() in ("false", "0", "no"):
            return False
        raise ConfigError(f"{key} = {value!r}: expected true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if from_cli:
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{key} = {value!r}: expected an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if from_cli:
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key} = {value!r}: expected a number")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. selective_ac_option = 2
        raise ConfigError(f"{key} = {value!r}: expected a string")
    raise AssertionError(f"unsupported config type {tp} for {key}")


def _check_section(section: str) -> None:
    """ConfigError naming an unknown section (with the closest existing one)."""
    if section not in SECTIONS:
        raise ConfigError(
            f"unknown config section '{section}'{_suggest(section, list(SECTIONS))}; "
            f"sections are: {', '.join(SECTIONS)}"
        )


def _field_type(dotted: str) -> Any:
    """The declared type of `section.key`; ConfigError naming an unknown section or key
    (with the closest existing one)."""
    section, _, key = dotted.partition(".")
    _check_section(section)
    types_ = _field_types(SECTIONS[section])
    if key not in types_:
        close = [f"{section}.{k}" for k in difflib.get_close_matches(key, list(types_), 1, 0.6)]
        # or the key of another section (training.lr for optimizer.lr)
        close += [f"{s}.{key}" for s, cls in SECTIONS.items() if key in _field_types(cls)]
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(
            f"unknown config key '{dotted}'{hint}; [{section}] has: {', '.join(types_)}"
        )
    return types_[key]


def _set(cfg: JobConfig, dotted: str, value: Any, from_cli: bool) -> None:
    tp = _field_type(dotted)
    section, _, key = dotted.partition(".")
    setattr(getattr(cfg, section), key, _coerce(dotted, value, tp, from_cli))


def _load_toml(path: str) -> dict[str, Any]:
    p = Path(path)
    if p.is_dir():
        inside = sorted(str(f) for f in p.glob("*.toml"))
        hint = f" (in it: {listing(inside, 8)})" if inside else ""
        raise ConfigError(f"job.config_file = {path!r} is a folder; name a TOML recipe{hint}")
    if not p.is_file():
        near = sorted(str(f) for f in p.parent.glob("*.toml")) if p.parent.is_dir() else []
        hint = f" (beside it: {listing(near, 8)})" if near else ""
        raise ConfigError(f"job.config_file = {path!r}: no such file{hint}")
    try:  # (utf-8-sig: a byte-order mark, as some Windows editors write, is not TOML)
        return tomllib.loads(p.read_bytes().decode("utf-8-sig"))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text (TOML files are UTF-8)") from None
    except OSError as e:
        raise ConfigError(f"job.config_file = {path!r}: cannot read it ({e.strerror})") from None


def _parse_cli(argv: list[str]) -> list[tuple[str, Any]]:
    """`--a.b=v`, `--a.b v`, bare `--a.flag` and `--a.no_flag` into (key, raw value) pairs."""
    pairs: list[tuple[str, Any]] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or "." not in arg:
            recipe = arg.endswith(".toml") or (arg == "--config" and i + 1 < len(argv))
            hint = (
                "; a recipe is passed as --job.config_file FILE"
                if recipe
                else ": options look like --section.key=value (see --help)"
            )
            raise ConfigError(f"unexpected argument {arg!r}{hint}")
        name, eq, value = arg[2:].partition("=")
        section, _, key = name.partition(".")
        key = key.replace("-", "_")
        cls = SECTIONS.get(section)
        types_ = {k: _base(t) for k, t in _field_types(cls).items()} if cls else {}
        is_bool = types_.get(key) is bool
        if not eq and not is_bool and key.startswith("no_") and types_.get(key[3:]) is bool:
            if section and key[3:]:
                pairs.append((f"{section}.{key[3:]}", False))
                i += 1
                continue
        if eq:
            pairs.append((f"{section}.{key}", value))
            i += 1
        elif is_bool and (i + 1 == len(argv) or argv[i + 1].startswith("--")):
            pairs.append((f"{section}.{key}", True))
            i += 1
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            pairs.append((f"{section}.{key}", argv[i + 1]))
            i += 2
        else:
            _field_type(f"{section}.{key}")  # a misspelled flag: say that, not "needs a value"
            raise ConfigError(f"--{name} needs a value (--{name}=VALUE)")
    return pairs


def format_help() -> str:
    lines = [
        "usage: train.py --job.config_file FILE [--section.key=VALUE ...]",
        "",
        "Command line overrides the TOML file, which overrides the defaults below.",
        "Booleans also take bare --section.flag / --section.no_flag; lists are comma-separated.",
    ]
    for section, cls in SECTIONS.items():
        lines.append(f"\n[{section}]")
        docs = _field_docs(cls)
        defaults = cls()
        for name, tp in _field_types(cls).items():
            default = getattr(defaults, name)
            lines.append(f"  --{section}.{name} ({_type_name(tp)}, default {default!r})")
            lines.append(f"      {docs.get(name, '')}")
    return "\n".join(lines)


def load_config(argv: list[str]) -> JobConfig:
    """Build the config from defaults, then the TOML file named by --job.config_file,
    then the other command-line overrides; check what needs no runtime information."""
    pairs = _parse_cli(argv)
    cfg = JobConfig()
    for key, value in pairs:  # find the recipe file first
        if key == "job.config_file":
            cfg.job.config_file = value
    if cfg.job.config_file:
        for section, values in _load_toml(cfg.job.config_file).items():
            if not isinstance(values, dict):
                raise ConfigError(f"{section} = {values!r}: top-level keys must be [sections]")
            _check_section(section)  # an empty misspelled [section] too
            for key, value in values.items():
                _set(cfg, f"{section}.{key}", value, from_cli=False)
    for key, value in pairs:
        _set(cfg, key, value, from_cli=True)
    check_combinations(cfg)
    return cfg


def check_combinations(cfg: JobConfig) -> None:
    """Checks that relate several fields, or a field and the code (the mesh checks need
    the world size: see `titan.distributed.ParallelDims`)."""
    from titan.models.llama import FLAVORS  # local: the model module imports torch

    if cfg.model.flavor not in FLAVORS:
        raise ConfigError(
            f"model.flavor = {cfg.model.flavor!r}: must be one of {', '.join(FLAVORS)}"
            f"{_suggest(cfg.model.flavor, list(FLAVORS))}"
        )
    for dotted, (supported, fix) in UNIMPLEMENTED.items():
        section, _, key = dotted.partition(".")
        value = getattr(getattr(cfg, section), key)
        if value != supported:
            raise ConfigError(f"{dotted} = {json.dumps(value)}: {fix}")
    if cfg.validation.enable and cfg.validation.split == cfg.data.split:
        raise ConfigError(
            f"validation.split = {cfg.validation.split!r} is the split training reads "
            "(data.split); validate on the other one"
        )
    if cfg.validation.enable and cfg.validation.freq > cfg.training.steps:
        raise ConfigError(
            f"validation.freq = {cfg.validation.freq} exceeds training.steps = "
            f"{cfg.training.steps}: validation would never run; lower validation.freq"
        )
    if cfg.profiling.enable_profiling and cfg.profiling.profile_freq > cfg.training.steps:
        raise ConfigError(
            f"profiling.profile_freq = {cfg.profiling.profile_freq} exceeds training.steps = "
            f"{cfg.training.steps}: no step would be profiled"
        )
