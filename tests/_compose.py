"""compose.yaml as data, for the tests of the container files and of monitoring."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML

__all__ = ["COMPOSE", "environment", "load_compose"]

COMPOSE = Path(__file__).resolve().parents[1] / "compose.yaml"


def load_compose() -> dict[str, Any]:
    loaded = YAML(typ="safe").load(COMPOSE)
    assert isinstance(loaded, dict)
    return loaded


def environment(service: Mapping[str, Any]) -> dict[str, str]:
    """A service's environment, whichever of Compose's two spellings it uses."""
    env = service.get("environment", {})
    if isinstance(env, list):
        return dict(item.partition("=")[::2] for item in env)
    return {key: str(value) for key, value in env.items()}
