"""Latency budgets for eval-bag and report, from a node parameter file and/or STAGE=MS flags.

Names and rule are serving.latency's (the node's): the pipeline stages plus ``image_to_output``
(image stamp to published output), in milliseconds, 0 meaning "no budget". Here they are kept as
a plain dict of the budgets that are set, which is what the report prints and draws.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import yaml

from vlm_ros.errors import InputError
from vlm_ros.serving.latency import NAMES, Budgets


def checked(values: Mapping[str, float], origin: str) -> dict[str, float]:
    """``values`` validated by latency.Budgets (unknown names refused), without the unset ones."""
    try:
        budgets = Budgets.from_mapping(values)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{origin}: {exc}") from None
    return {k: v for k, v in budgets.as_dict().items() if v > 0}


def parse_budget_flags(flags: Iterable[str]) -> dict[str, float]:
    """``["total=500", "vision=80"]`` -> ``{"total": 500.0, "vision": 80.0}``."""
    values: dict[str, float] = {}
    for flag in flags:
        name, sep, value = flag.partition("=")
        try:
            values[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise InputError(
                f"bad budget {flag!r}: expected STAGE=MS, STAGE one of {', '.join(NAMES)}"
            )
    return checked(values, "bad budget") if values else {}


def load_budgets(path: str | Path) -> dict[str, float]:
    """The ``budget_<name>_ms`` parameters of a node parameter YAML (config/*.yaml)."""
    try:
        doc = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise InputError(f"{path}: not valid YAML ({' '.join(str(exc).split())})") from None
    params = _ros_parameters(doc)
    found = {
        k[len("budget_") :]: v
        for k, v in params.items()
        if k.startswith("budget_") and k.endswith("_ms")
    }
    return checked(found, str(path))


def _ros_parameters(doc) -> dict:
    """The flattened ``ros__parameters`` of the first node in a parameter file."""
    for node in doc.values() if isinstance(doc, dict) else ():
        if isinstance(node, dict) and isinstance(node.get("ros__parameters"), dict):
            return _flatten(node["ros__parameters"])
    return _flatten(doc) if isinstance(doc, dict) else {}


def _flatten(d: dict, prefix: str = "") -> dict:
    """Nested parameter groups as ``group_key`` names: ``budget: {total_ms: 5}`` becomes
    ``budget_total_ms``."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "_"))
        else:
            out[key] = v
    return out
