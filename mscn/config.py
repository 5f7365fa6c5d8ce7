"""The configuration of mscn: the typed schema of :mod:`mscn.config_schema`, built from
defaults -> YAML file -> ``a.b=value`` CLI overrides, in that order. Unknown keys,
wrong types and out-of-range values raise :class:`~mscn.errors.ConfigError` with one
line naming the key and the file. The resolved config is written into the run
directory (``config.yaml``) so that a run can always be reproduced and resumed.

Every name of the schema (``Config``, ``MaskCfg``, ...) and of the checks (``validate``,
``validate_view``, ``validate_mask``; ``checked`` and ``typed`` for configs built in code) is
importable from here.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import os
import re
import types
import typing
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from mscn.config_checks import validate, validate_mask, validate_view  # noqa: F401  (re-exported)
from mscn.config_schema import (IMAGENET_MEAN, IMAGENET_STD, Config, DataCfg, EvalCfg, HighPassCfg,  # noqa: F401
                                MaskCfg, MethodCfg, ModelCfg, OptimCfg, ScheduleCfg, TrainCfg, ViewCfg,
                                default_views)
from mscn.errors import CommandLineError, ConfigError

# ----------------------------------------------------------------------------------
# Building a typed Config from plain dicts
# ----------------------------------------------------------------------------------

_SCIENTIFIC = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def is_integer(value: Any) -> bool:
    """An integer, numpy's included (numbers.Integral), and not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def _convert(value: Any, tp: Any, key: str, src: str) -> Any:
    """Coerce ``value`` to type ``tp`` or raise a one-line ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{src}: {key}: expected a mapping, got {value!r}")
        return _build(tp, value, key, src)
    if isinstance(value, np.ndarray) and origin in (list, tuple):  # mean=np.array([...]) in code
        value = value.tolist()
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{src}: {key}: expected a list, got {value!r}")
        return [_convert(v, item_tp, f"{key}[{i}]", src) for i, v in enumerate(value)]
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{src}: {key}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_convert(v, a, f"{key}[{i}]", src) for i, (v, a) in enumerate(zip(value, args)))
    if origin in (typing.Union, types.UnionType):  # e.g. int | str: "auto" or a number
        for arg in typing.get_args(tp):
            try:
                return _convert(value, arg, key, src)
            except ConfigError:
                continue
        names = " or ".join({int: "an integer", float: "a number"}.get(a, "a string") for a in typing.get_args(tp))
        raise ConfigError(f"{src}: {key}: expected {names}, got {value!r}")
    if tp is bool:
        if isinstance(value, (bool, np.bool_)):
            return bool(value)
        raise ConfigError(f"{src}: {key}: expected true/false, got {value!r}")
    if tp is int:  # numpy's integers too, made plain ints
        if is_integer(value):
            return int(value)
        raise ConfigError(f"{src}: {key}: expected an integer, got {value!r}")
    if tp is float:
        number = None
        if isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)):
            number = float(value)
        elif isinstance(value, str) and _SCIENTIFIC.fullmatch(value.strip()):
            number = float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string; it is a number
        if number is None:
            raise ConfigError(f"{src}: {key}: expected a number, got {value!r}")
        if not math.isfinite(number):  # YAML's .inf / .nan: every setting is a finite number
            raise ConfigError(f"{src}: {key}: expected a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, str):
            # '~/data' in a YAML recipe (or a quoted override): no shell expands it there, and
            # train.out_dir would become a folder named '~' in the current one
            return os.path.expanduser(value) if key in PATH_KEYS and value.startswith("~") else value
        if isinstance(value, os.PathLike):  # data.root=Path(...) in code
            return os.path.expanduser(os.fspath(value))
        kind = "true/false" if isinstance(value, bool) else "a number"
        hint = (f" (YAML reads it as {kind}: quote it, e.g. \"{key}='{value}'\" on a command line)"
                if isinstance(value, (int, float, bool)) else "")
        raise ConfigError(f"{src}: {key}: expected a string, got {value!r}{hint}")
    raise ConfigError(f"{src}: {key}: unsupported type {tp}")  # schema bug, not user error


PATH_KEYS = frozenset({"data.root", "data.val_root", "data.synthetic_dir", "train.out_dir"})


def _build(cls: type, data: dict, prefix: str, src: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in data:
        if k not in names:
            where = f"{prefix}.{k}" if prefix else str(k)
            raise ConfigError(f"{src}: unknown key '{where}' (valid: {', '.join(sorted(names))})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            key = f"{prefix}.{f.name}" if prefix else f.name
            kwargs[f.name] = _convert(data[f.name], hints[f.name], key, src)
    return cls(**kwargs)


def _merge(base: dict, upd: dict) -> dict:
    out = dict(base)
    for k, v in upd.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def to_dict(cfg: Any) -> Any:
    """Plain dict/list form (tuples as lists) suitable for YAML and checkpoints."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def from_dict(data: dict, src: str = "<dict>") -> Config:
    cfg = _build(Config, data or {}, "", src)
    validate(cfg, src)
    return cfg


def typed(value: Any, tp: type, src: str = "<config>", key: str = "") -> Any:
    """``value`` (a schema dataclass built in code, or a dict of its keys) rebuilt as ``tp``
    with the schema's types: a dataclass does not check the types it is given, so
    ``DataCfg(image_size="32")`` or ``ViewCfg(scale=0.5)`` would otherwise fail deep in a
    pipeline. One ConfigError line names the key."""
    if not isinstance(value, (tp, dict)):
        raise ConfigError(f"{src}: {key or 'config'}: expected a mscn.config.{tp.__name__} (or a dict of its keys), "
                          f"got {type(value).__name__}")
    _no_stray_attributes(value, key, src)
    return _build(tp, to_dict(value), key, src)


def _no_stray_attributes(value: Any, key: str, src: str) -> None:
    """An attribute set in code that is no field of its schema dataclass (a typo:
    ``cfg.data.image_sise = 32``) is the unknown key a YAML recipe would have: a dataclass
    takes it without a word, and :func:`to_dict` would drop it, so the run would silently
    use the default. A schema class where its instance belongs (``views=[ViewCfg]``) is named
    too: :func:`to_dict` would read its class attributes (an AttributeError, or the defaults)."""
    if isinstance(value, type) and dataclasses.is_dataclass(value):
        raise ConfigError(f"{src}: {key or 'config'}: the class {value.__name__} itself where an instance belongs; "
                          f"write {value.__name__}() (or an instance of the class this key takes)")
    if dataclasses.is_dataclass(value):
        names = {f.name for f in dataclasses.fields(value)}
        for k in vars(value):
            if k not in names:
                where = f"{key}.{k}" if key else k
                raise ConfigError(f"{src}: unknown key '{where}' (valid: {', '.join(sorted(names))})")
        for f in dataclasses.fields(value):  # in schema order: the first typo is named
            _no_stray_attributes(getattr(value, f.name), f"{key}.{f.name}" if key else f.name, src)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _no_stray_attributes(v, f"{key}.{i}", src)
    elif isinstance(value, dict):
        for k, v in value.items():
            _no_stray_attributes(v, f"{key}.{k}" if key else str(k), src)


def checked(cfg: Config | dict, src: str = "<config>", world_size: int = 1, siamese: bool = True) -> Config:
    """A config built in code (or a dict), with the schema's types and ranges checked as a
    YAML recipe's are (:func:`typed`, :func:`validate`; ``siamese=False``: for a loader alone,
    one view and a batch of 1 allowed)."""
    cfg = typed(cfg, Config, src)
    validate(cfg, src, world_size=world_size, siamese=siamese)
    return cfg


# ----------------------------------------------------------------------------------
# Overrides: a.b=value, views.1.mask.ratio=0.3, views=[...] (YAML values; a mapping merges)
# ----------------------------------------------------------------------------------

def apply_override(tree: dict, item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"override '{item}': expected key=value (e.g. train.global_batch=256)")
    key, raw = item.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    parts = key.split(".")
    node: Any = tree
    for i, p in enumerate(parts[:-1]):
        nxt = parts[i + 1]
        if not isinstance(node, (dict, list)):  # train.global_batch.x=3: a key below a value
            raise ConfigError(f"override '{key}': '{'.'.join(parts[:i])}' is a value ({node!r}), not a section")
        if isinstance(node, list):
            idx = _index(p, node, key)
            node = node[idx]
            continue
        if p not in node or node[p] is None:
            node[p] = [] if nxt.isdigit() else {}
        node = node[p]
    last = parts[-1]
    if not isinstance(node, (dict, list)):
        raise ConfigError(f"override '{key}': '{'.'.join(parts[:-1])}' is a value ({node!r}), not a section")
    at = _index(last, node, key) if isinstance(node, list) else last
    old = node[at] if isinstance(node, list) else node.get(at)
    # a mapping merges into the section, as the YAML file merges into the defaults:
    # `views.1={mask: {ratio: 0.3}}` is `views.1.mask.ratio=0.3`, not a default view 1
    node[at] = _merge(old, value) if isinstance(value, dict) and isinstance(old, dict) else value


def _index(p: str, node: list, key: str) -> int:
    if not p.isdigit() or int(p) >= len(node):
        raise ConfigError(f"override '{key}': '{p}' is not a valid index (list has {len(node)} items)")
    return int(p)


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, but a key written twice in one mapping is an error: YAML keeps
    the last, so a second ``data:`` block would silently drop the whole first one."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice (first on line {seen[key] + 1}): YAML would keep only "
                    "the last one", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def yaml_error_text(e: yaml.YAMLError) -> str:
    """PyYAML's error as one line, with the line and column where it has them."""
    what = getattr(e, "problem", None) or str(e).splitlines()[0]
    mark = getattr(e, "problem_mark", None)
    return f"line {mark.line + 1}, column {mark.column + 1}: {what}" if mark is not None else what


def read_yaml(text: str):
    """A user's YAML file (a recipe, an arms file): safe types only, no duplicate keys."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the YAML file at ``path`` (a path or a bundled recipe name), then overrides."""
    tree = to_dict(Config())
    src = "<defaults>"
    if path:
        p = resolve_config_path(path)
        src = str(p)
        try:
            loaded = read_yaml(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{src}: not valid YAML ({yaml_error_text(e)})") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"{src}: not a UTF-8 text file (byte {e.start}); is it the YAML recipe?") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{src}: expected a mapping at the top level")
        # a YAML view list replaces the default list wholesale (views are not merged by index)
        tree = _merge(tree, loaded)
    file_tree = tree
    tree = _copy(tree)
    for item in overrides or []:
        try:
            apply_override(tree, item)
        except ConfigError as e:
            raise CommandLineError(f"command line: {item}: {str(e).split(': ', 1)[-1]}") from None
    try:
        return from_dict(tree, src)
    except ConfigError as e:
        if not overrides:
            raise
        try:  # does the file (or the defaults) alone hold the error? then it is the file's
            from_dict(file_tree, src)
        except ConfigError:
            raise e from None
        raise CommandLineError(f"command line: {_blame(str(e).removeprefix(f'{src}: '), overrides)}") from None


def _copy(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: _copy(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_copy(v) for v in tree]
    return tree


def _blame(msg: str, overrides: list[str]) -> str:
    """``train.global_batch=abc: <msg>``: the override(s) whose key the message names,
    else all of them (a range check across keys)."""
    dotted = re.sub(r"\[(\d+)\]", r".\1", msg)  # messages spell a view views[0].mask, overrides views.0.mask

    def names(o: str) -> bool:  # the key, or one of its parts quoted ("unknown key 'highpas'")
        key = o.split("=", 1)[0].strip()
        return key in dotted or any(f"'{part}'" in msg for part in key.split("."))

    named = [o for o in overrides if "=" in o and names(o)]
    return f"{' '.join(named or overrides)}: {msg}"


def resolve_config_path(path: str | Path) -> Path:
    p = Path(path)
    if p.is_file():
        return p
    bundled = Path(__file__).resolve().parent.parent / "configs"
    try:  # installed (non-editable): configs ship as the mscn.configs package
        import mscn.configs as _c

        bundled = Path(_c.__file__).parent
    except ImportError:
        pass
    name = p.name if p.suffix else p.name + ".yaml"
    if (bundled / name).is_file():
        return bundled / name
    recipes = ", ".join(sorted(x.stem for x in bundled.glob("*.yaml")))
    if p.is_dir():  # e.g. a run directory: its recipe is the config.yaml inside
        inside = f"; its {p / 'config.yaml'} is a run's config" if (p / "config.yaml").is_file() else ""
        raise ConfigError(f"--config {path}: a directory, not a YAML recipe{inside} (bundled recipes: {recipes})")
    raise ConfigError(f"config file not found: {path} (bundled recipes: {recipes})")


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def __getattr__(name: str):
    """``highpass_window`` / ``highpass_params`` now live in :mod:`mscn.highpass`; they are
    still importable from here, loaded on first use so that reading a config needs no torch."""
    if name in ("highpass_window", "highpass_params"):
        import mscn.highpass

        return getattr(mscn.highpass, name)
    raise AttributeError(f"module 'mscn.config' has no attribute {name!r}")
