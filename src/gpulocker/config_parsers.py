"""Parsers of the JSON-valued settings (GPU_CONFIG, QUOTAS); config.py uses them.

Each raises ValueError saying what is expected; config.py adds the key's name."""

from __future__ import annotations

import json
import re

QUOTA_KEYS = ("gpu_hours_per_week", "max_gpus")
QUOTA_NAME = re.compile(r"^@?[a-z_][a-z0-9_.-]{0,31}\$?$", re.IGNORECASE)


def parse_quotas(raw: str) -> dict[str, dict[str, float]]:
    """QUOTAS: {"alice": {"max_gpus": 2}, "@students": {"gpu_hours_per_week": 100}}."""
    if not raw.strip():
        return {}
    expected = (
        'a JSON object of user or "@group" names to {"gpu_hours_per_week": number >= 0, '
        '"max_gpus": integer >= 0}'
    )
    try:
        value = json.loads(raw)
    except ValueError:
        raise ValueError(expected) from None
    if not isinstance(value, dict):
        raise ValueError(expected)
    quotas: dict[str, dict[str, float]] = {}
    for name, limits in value.items():
        if not isinstance(name, str) or not QUOTA_NAME.match(name) or not isinstance(limits, dict):
            raise ValueError(f"{expected}; bad entry {name!r}")
        entry: dict[str, float] = {}
        for key, limit in limits.items():
            if key not in QUOTA_KEYS:
                raise ValueError(f"{expected}; unknown key {key!r} for {name!r}")
            number = isinstance(limit, int | float) and not isinstance(limit, bool)
            if not number or limit != limit or limit < 0 or limit == float("inf"):
                raise ValueError(f"{expected}; bad {key} for {name!r}")
            if key == "max_gpus" and int(limit) != limit:
                raise ValueError(f"{expected}; max_gpus of {name!r} must be whole")
            entry[key] = int(limit) if key == "max_gpus" else float(limit)
        quotas[name] = entry
    return quotas


def parse_gpu_config(raw: str) -> dict[str, list[int]]:
    """`{"4090": [0,1,2,3]}`: type -> GPU indices; empty means auto-detect."""
    expected = 'JSON mapping a GPU type to a list of GPU ids, e.g. {"4090": [0,1,2,3]}'
    if not raw.strip():
        return {}
    try:
        data = json.loads(raw)
    except json.JSONDecodeError:
        raise ValueError(expected) from None
    if not isinstance(data, dict):
        raise ValueError(expected)
    seen: set[int] = set()
    result: dict[str, list[int]] = {}
    for gpu_type, ids in data.items():
        if not gpu_type or not isinstance(ids, list) or not ids:
            raise ValueError(expected)
        for gpu_id in ids:
            if isinstance(gpu_id, bool) or not isinstance(gpu_id, int) or gpu_id < 0:
                raise ValueError(expected)
            if gpu_id in seen:
                raise ValueError(f"each GPU id once (id {gpu_id} appears twice)")
            seen.add(gpu_id)
        result[str(gpu_type)] = list(ids)
    return result
