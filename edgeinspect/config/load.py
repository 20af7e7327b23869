"""Building a validated config (preset, then YAML, then `a.b=c` overrides), and dumping one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from edgeinspect.config.base import ConfigError
from edgeinspect.config.methods import AnyConfig, METHODS
from edgeinspect.config.presets import PRESETS



def merge_config(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in override.items():
        out[k] = merge_config(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration ({source}):"]
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "<root>"
        lines.append(f"  {path}: {e['msg']}")
    return "\n".join(lines)


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """`a.b.c=value` strings (value parsed as YAML) into a nested dict."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.field=value")
        key, raw = item.split("=", 1)
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = yaml.safe_load(raw)
    return out


def build_config(
    method: str, preset: str | None = None, data: dict[str, Any] | None = None, source: str = "<dict>"
) -> AnyConfig:
    """A validated config for `method`: preset defaults, then `data` on top."""
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; known: {sorted(METHODS)}")
    data = dict(data or {})
    preset = preset or data.get("model", {}).get("preset") or "edge"
    if preset not in PRESETS[method]:
        raise ConfigError(f"unknown preset {preset!r} for {method}; known: {sorted(PRESETS[method])}")
    merged = merge_config(PRESETS[method][preset], data)
    merged.setdefault("model", {}).setdefault("preset", preset)
    try:
        return METHODS[method].model_validate(merged)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None


def load_config(
    path: str | Path | None, method: str = "diad", preset: str | None = None, overrides: list[str] | None = None
) -> AnyConfig:
    """Load a YAML config (or only a preset when `path` is None) and apply `a.b=c` overrides."""
    data: dict[str, Any] = {}
    source = "preset"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
        data = loaded
        method = data.pop("method", method)
        source = str(path)
    data = merge_config(data, parse_overrides(overrides))
    return build_config(method, preset, data, source)


def dump_config(cfg: BaseModel) -> dict[str, Any]:
    return cfg.model_dump(mode="json")
