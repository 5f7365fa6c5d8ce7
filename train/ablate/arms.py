"""Named ablation grids (paper §5.1-5.2, §6.3 Fig. 5a-d, Table 1): a small registry of
builders, each turning the resolved recipe into a list of :class:`Arm` (config overrides).

Overrides are derived from the recipe itself (its views, its grid size), so that a grid
means the same thing for the demo recipe and for the ImageNet ones. "Masks off" is
``mask.ratio=0`` on every view; "high-pass off" is ``highpass.enabled=false``. The
baseline arm (the method without masks and without high-pass, same views, schedule
and budget) is always run: every difference in the report is taken against it.
"""
from __future__ import annotations

import difflib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from mscn.config import Config, load_config, read_yaml, to_dict, yaml_error_text
from mscn.errors import ConfigError, MscnError

BASELINE = "baseline"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.=+-]*$")  # an arm name is also a folder name


@dataclass(frozen=True)
class Arm:
    """One setting of the ablation: ``overrides`` on top of the recipe (and the command line).

    ``param``/``value``: the panel and the x position of the arm in the Fig. 5-style plot
    (``value`` a number or a label)."""
    name: str
    overrides: tuple[str, ...] = ()
    param: str = ""
    value: float | str = ""
    grid: str = ""  # the named grid that asked for it


def _all_views(cfg: Config, key: str, value) -> tuple[str, ...]:
    return tuple(f"views.{i}.{key}={value}" for i in range(len(cfg.views)))


def _masks_off(cfg: Config) -> tuple[str, ...]:
    return _all_views(cfg, "mask.ratio", 0)


def baseline(cfg: Config) -> Arm:
    """The method without masks and without high-pass, on the recipe's views and budget."""
    return Arm(BASELINE, _masks_off(cfg) + ("highpass.enabled=false",), "highpass", "none", "baseline")


def highpass(cfg: Config) -> list[Arm]:
    """Masks x high-pass, 2 x 2 (§5.1: masks alone 21.0 vs 30.2 with high-pass on ImageNet)."""
    return [baseline(cfg),
            Arm("masks", ("highpass.enabled=false",), "highpass", "masks"),
            Arm("highpass", _masks_off(cfg) + ("highpass.enabled=true",), "highpass", "high-pass"),
            Arm("mscn", ("highpass.enabled=true",), "highpass", "masks+high-pass")]


def ratio(cfg: Config) -> list[Arm]:
    """Masking ratio on every view (Fig. 5a: 15 % optimal, stable up to 50 %)."""
    return [Arm(f"ratio={r}", _all_views(cfg, "mask.ratio", r), "mask ratio", r) for r in (0.05, 0.15, 0.3, 0.5)]


def grid(cfg: Config) -> list[Arm]:
    """Mask cell size x1/2, x1, x2 of the recipe's first view (Fig. 5b: 32 px optimal at 224 px)."""
    g0 = cfg.views[0].mask.grid
    return [Arm(f"grid={g}", _all_views(cfg, "mask.grid", g), "mask grid (px)", g)
            for g in (max(1, g0 // 2), g0, g0 * 2)]


def focal(cfg: Config) -> list[Arm]:
    """Focal-mask probability (Fig. 5c: 0.4 optimal)."""
    return [Arm(f"p_focal={p}", _all_views(cfg, "mask.p_focal", p), "p_focal", p) for p in (0.0, 0.4, 1.0)]


def channel(cfg: Config) -> list[Arm]:
    """Channel-independent mask probability (Fig. 5d: a high probability helps)."""
    return [Arm(f"p_ind={p}", _all_views(cfg, "mask.p_ind", p), "p_ind", p) for p in (0.0, 0.5, 1.0)]


def noise(cfg: Config) -> list[Arm]:
    """Noisy-mask probability (§5.2 "Noisy Mask"; the paper gives no figure)."""
    return [Arm(f"p_noise={p}", _all_views(cfg, "mask.p_noise", p), "p_noise", p) for p in (0.0, 0.5, 1.0)]


def views(cfg: Config) -> list[Arm]:
    """2 views vs 2 + 2 masked extra views (§5.2 "Multicrops"); a 2-view recipe gets two
    copies of its first (masked) view as the extras."""
    main = cfg.views[:2]
    extra = cfg.views[2:4] if len(cfg.views) >= 4 else [cfg.views[0]] * 2
    as_yaml = lambda vs: json.dumps(to_dict(vs))  # noqa: E731  JSON is YAML: one views=[...] override
    return [Arm("views=2", (f"views={as_yaml(main)}",), "views", 2),
            Arm("views=4", (f"views={as_yaml(main + extra)}",), "views", 4)]


def method(cfg: Config) -> list[Arm]:
    """SimCLR vs BYOL, each with and without MSCN (Table 1: +2.0 and +0.2 points)."""
    off = baseline(cfg).overrides
    return [Arm("simclr", ("method.name=simclr",) + off, "method", "SimCLR"),
            Arm("simclr+mscn", ("method.name=simclr",), "method", "SimCLR+MSCN"),
            Arm("byol", ("method.name=byol",) + off, "method", "BYOL"),
            Arm("byol+mscn", ("method.name=byol",), "method", "BYOL+MSCN")]


GRIDS: dict[str, Callable[[Config], list[Arm]]] = {
    "highpass": highpass, "ratio": ratio, "grid": grid, "focal": focal, "channel": channel,
    "noise": noise, "views": views, "method": method,
}
PAPER = tuple(GRIDS)  # "paper": every grid above


ARM_KEYS = ("overrides", "param", "value")  # of an arm written as a mapping
# keys the runner sets for every run, and how to choose them
OWN_KEYS = {"train.seed": "--seeds N runs seeds train.seed .. +N-1; train.seed=S on the command line "
                          "sets the first",
            "train.out_dir": "each run's folder is --out/runs/<arm>/seed<k>"}


def read_arms_file(path: str | Path) -> list[Arm]:
    """Custom arms from YAML: ``name: [key=value, ...]`` or ``name: {overrides: [...], param:, value:}``."""
    p = Path(path)
    try:
        data = read_yaml(p.read_text())
    except yaml.YAMLError as e:
        raise MscnError(f"--arms-file {path}: not valid YAML ({yaml_error_text(e)})") from None
    except OSError as e:
        raise MscnError(f"--arms-file {path}: cannot read it ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict) or not data:
        raise MscnError(f"--arms-file {path}: expected a mapping 'name: [key=value, ...]'")
    arms = []
    for name, spec in data.items():
        if isinstance(spec, dict):
            unknown = sorted(str(k) for k in spec if k not in ARM_KEYS)
            if unknown:  # a typo (``overides:``) would otherwise run the bare recipe under this arm's name
                near = {u: difflib.get_close_matches(u, ARM_KEYS, n=1) for u in unknown}
                hint = "; ".join(f"did you mean {near[u][0]!r} for {u!r}?" for u in unknown if near[u])
                raise MscnError(f"--arms-file {path}: arm '{name}': unknown key(s) {', '.join(map(repr, unknown))} "
                                f"(an arm takes {', '.join(ARM_KEYS)})" + (f"; {hint}" if hint else ""))
            ov, param, value = spec.get("overrides", []), spec.get("param", "custom"), spec.get("value", str(name))
        else:
            ov, param, value = spec, "custom", str(name)
        if not isinstance(ov, list) or not all(isinstance(o, str) for o in ov):
            raise MscnError(f"--arms-file {path}: arm '{name}': overrides must be a list of key=value strings")
        arms.append(Arm(str(name), tuple(ov), str(param), value, grid="file"))
    return arms


def expand(names: str, cfg: Config, arms_file: str | None = None) -> list[Arm]:
    """The baseline, then the arms of every grid in ``names`` (comma-separated; ``paper`` = all
    grids), then the arms file's; an arm asked for twice runs once. One-line MscnError for an
    unknown grid or a bad arm name."""
    wanted = [n.strip() for n in names.split(",") if n.strip()] if names else []
    arms: list[Arm] = [baseline(cfg)]
    for n in wanted:
        if n != "paper" and n not in GRIDS:
            raise MscnError(f"unknown arm '{n}' (valid: {', '.join([*GRIDS, 'paper'])}; or --arms-file FILE)")
        for g in (PAPER if n == "paper" else (n,)):
            arms += [Arm(a.name, a.overrides, a.param, a.value, g) for a in GRIDS[g](cfg)]
    if arms_file:
        arms += read_arms_file(arms_file)
    if not wanted and not arms_file:
        raise MscnError("no arms: pass --arms GRID[,GRID...] and/or --arms-file FILE")
    seen: dict[str, Arm] = {}
    for a in arms:
        if not _NAME.match(a.name):
            raise MscnError(f"arm name '{a.name}': use letters, digits and _ . = + - (it names a folder)")
        for o in a.overrides:  # the runner sets both per run: an arm's own would be dropped without a word
            key = o.split("=", 1)[0].strip()
            if key in OWN_KEYS:
                raise MscnError(f"arm '{a.name}': {key} is set per run by mscn ablate ({OWN_KEYS[key]}); "
                                "an arm cannot set it")
        if a.name in seen and seen[a.name].overrides != a.overrides:
            raise MscnError(f"arm '{a.name}' is defined twice with different overrides")
        seen.setdefault(a.name, a)
    return list(seen.values())


def resolve(arms: list[Arm], config: str, overrides: list[str]) -> dict[str, Config]:
    """Every arm's full config, validated before anything runs (one-line error naming the arm)."""
    out = {}
    for a in arms:
        try:
            out[a.name] = load_config(config, list(overrides) + list(a.overrides))
        except ConfigError as e:
            # the command line's overrides alone were checked before: the arm's make the error
            where = "--arms-file" if a.grid == "file" else f"grid {a.grid}"
            raise MscnError(f"arm '{a.name}' ({where}): {str(e).removeprefix('command line: ')}") from None
    return out
