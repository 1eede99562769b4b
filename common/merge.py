"""The one deep merge: config layers (YAML file, then overrides) and a user's DeepSpeed JSON over the derived one."""
from __future__ import annotations


def deep_merge(base: dict, top: dict) -> dict:
    """A new dict: top's values over base's, merging nested dicts key by key (neither input is changed)."""
    out = dict(base)
    for key, value in top.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out
