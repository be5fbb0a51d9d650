"""compose.yaml as data, for the tests of the container files and of monitoring."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML

__all__ = ["COMPOSE", "FULL_COMPOSE", "environment", "load_compose", "merged"]

COMPOSE = Path(__file__).resolve().parents[1] / "compose.yaml"
#: The full stack's overlay: ``docker compose -f compose.yaml -f compose.full.yaml``.
FULL_COMPOSE = COMPOSE.with_name("compose.full.yaml")


def load_compose(path: Path = COMPOSE) -> dict[str, Any]:
    loaded = YAML(typ="safe").load(path)
    assert isinstance(loaded, dict)
    return loaded


def merged(base: Mapping[str, Any], overlay: Mapping[str, Any]) -> dict[str, Any]:
    """``overlay`` merged into ``base`` as ``docker compose -f base -f overlay`` does
    for what these files use: mappings (services, environment, depends_on,
    volumes) merge key by key, anything else in the overlay replaces the base's.
    (Compose appends some sequences, ports and volumes among them; the overlay
    sets none of those on a service the base has, which the tests check.)"""
    result = dict(base)
    for key, value in overlay.items():
        if isinstance(value, Mapping) and isinstance(result.get(key), Mapping):
            result[key] = merged(result[key], value)
        else:
            result[key] = value
    return result


def environment(service: Mapping[str, Any]) -> dict[str, str]:
    """A service's environment, whichever of Compose's two spellings it uses."""
    env = service.get("environment", {})
    if isinstance(env, list):
        return dict(item.partition("=")[::2] for item in env)
    return {key: str(value) for key, value in env.items()}
