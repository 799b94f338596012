"""Experiment grids: ordered, named settings, each a list of ``--set`` overrides; the first is the baseline.

Built-in grids follow the paper's tables (weights l1 = 1.0 for L_con and l2 = 0.5 for L_ali, as the
paper trains them), plus `margins`: the margin heads the paper compares against, each without cluster terms. A user grid is a JSON or YAML file ``{"settings": {"name": ["key=value", ...], ...}}``
(order kept, first = baseline).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from largefr.choices import ADAPTIVE_MARGIN_TYPES
from largefr.config import ConfigError
from largefr.config_loading import read_file
from largefr.errors import UserError

__all__ = ["Setting", "Grid", "GridError", "BUILTIN_GRIDS", "load_grid"]

_CON, _ALI = "cluster.contrastive_weight=1.0", "cluster.aligning_weight=0.5"
_NO_CON, _NO_ALI = "cluster.contrastive_weight=0", "cluster.aligning_weight=0"
_CG, _NO_CG = "cluster.cg_margin=true", "cluster.cg_margin=false"


class GridError(UserError, ValueError):
    """A grid that cannot be run: unknown name, unreadable file, or a badly formed setting."""


@dataclass(frozen=True, kw_only=True)
class Setting:
    name: str
    """Also the run folder's name: <out>/runs/<name>/seed<seed>/."""
    overrides: tuple[str, ...]
    """``KEY=VALUE`` overrides applied to the base config for this setting."""


@dataclass(frozen=True, kw_only=True)
class Grid:
    name: str
    settings: tuple[Setting, ...]
    """In order; settings[0] is the baseline the paired differences are taken against."""

    @property
    def baseline(self) -> Setting:
        return self.settings[0]


def _grid(name: str, settings: dict[str, list[str]]) -> Grid:
    return Grid(name=name, settings=tuple(Setting(name=k, overrides=tuple(v)) for k, v in settings.items()))


BUILTIN_GRIDS: dict[str, Grid] = {
    # Table 2: each term of the method on its own, in pairs, and all three.
    "table2": _grid("table2", {
        "arcface": [_NO_CG, _NO_CON, _NO_ALI],
        "cg_arcface": [_CG, _NO_CON, _NO_ALI],
        "arcface+con": [_NO_CG, _CON, _NO_ALI],
        "arcface+ali": [_NO_CG, _NO_CON, _ALI],
        "cg+con": [_CG, _CON, _NO_ALI],
        "cg+ali": [_CG, _NO_CON, _ALI],
        "cg+con+ali": [_CG, _CON, _ALI],
    }),
    # Table 3: L_con against Center loss and Triplet loss in its place, CG-ArcFace and L_ali on.
    "table3": _grid("table3", {
        "cluster_con": [_CG, _CON, _ALI, "cluster.contrastive_type=cluster"],
        "center": [_CG, _CON, _ALI, "cluster.contrastive_type=center"],
        "triplet": [_CG, _CON, _ALI, "cluster.contrastive_type=triplet"],
    }),
    # Table 4: a typical learnable temperature tau0 against the class-adaptive phi. adaptive_phi keeps the
    # base config's temperature_mode: 'raw' in the paper-literal config, 'pcl' in the tuned default.
    "table4": _grid("table4", {
        "learnable_tau0": [_CG, _CON, _ALI, "cluster.temperature_mode=learnable"],
        "adaptive_phi": [_CG, _CON, _ALI],
    }),
    # The margin heads of issue 15 side by side, each alone (no cluster term), with its paper's defaults.
    "margins": _grid("margins", {
        "arcface": [_NO_CG, _NO_CON, _NO_ALI],
        **{kind: [_NO_CG, _NO_CON, _NO_ALI, f"head.type={kind}"]
           for kind in ADAPTIVE_MARGIN_TYPES},
    }),
}


def _check_name(name: object, where: str) -> str:
    if not isinstance(name, str) or not name.strip():
        raise GridError(f"{where}: a setting name must be a non-empty string, got {name!r}")
    if "/" in name or "\\" in name or name.startswith(".") or name != name.strip():
        raise GridError(f"{where}: setting {name!r}: the name is a folder name; use no slashes, no leading dot "
                        "and no surrounding spaces")
    return name


def _check_overrides(name: str, overrides: object, where: str) -> tuple[str, ...]:
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise GridError(f"{where}: setting {name!r}: expected a list of \"key=value\" strings, got {overrides!r}")
    malformed = [o for o in overrides if "=" not in o or not o.partition("=")[0].strip()]
    if malformed:
        raise GridError(f"{where}: setting {name!r}: {malformed} not of the form key=value "
                        "(e.g. cluster.contrastive_weight=0)")
    return tuple(overrides)


def grid_from_data(data: object, where: str, name: str) -> Grid:
    """A grid from parsed file content ``{"settings": {name: [overrides]}}``; `where` names the source in errors."""
    if not isinstance(data, dict) or set(data) != {"settings"} or not isinstance(data["settings"], dict):
        keys = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise GridError(f"{where}: a grid file holds exactly one key, \"settings\", mapping each setting's name to "
                        f"its list of \"key=value\" overrides (got {keys})")
    if not data["settings"]:
        raise GridError(f"{where}: \"settings\" is empty; the first setting is the baseline, give at least one")
    settings = tuple(Setting(name=_check_name(k, where), overrides=_check_overrides(k, v, where))
                     for k, v in data["settings"].items())
    return Grid(name=name, settings=settings)


def load_grid(spec: str) -> Grid:
    """A built-in grid by name, or a user grid from the JSON/YAML file at `spec`."""
    if spec in BUILTIN_GRIDS:
        return BUILTIN_GRIDS[spec]
    path = Path(spec)
    if path.suffix not in (".json", ".yaml", ".yml"):
        raise GridError(f"--grid {spec}: neither a built-in grid ({', '.join(BUILTIN_GRIDS)}) nor a .json/.yaml "
                        "grid file")
    try:
        data = read_file(path)
    except ConfigError as error:  # missing file, parse error, duplicate keys: its text names the file
        raise GridError(f"grid file {path}: {'; '.join(message for _, message in error.issues)}") from None
    return grid_from_data(data, f"grid file {path}", path.stem)
