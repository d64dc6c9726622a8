"""Parsers of setting values: the small ones (numbers, words, paths, URLs) and the
JSON-valued ones (GPU_CONFIG, QUOTAS); config.py's KEYS table uses them.

Each raises ValueError saying what is expected; config.py adds the key's name."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")
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


def _str(raw: str) -> str:
    return raw


def _optional_str(raw: str) -> str | None:
    return raw or None


def _int_range(low: int, high: int | None = None) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        expected = f"an integer >= {low}" if high is None else f"an integer {low}-{high}"
        try:
            value = int(raw)
        except ValueError:
            raise ValueError(expected) from None
        if value < low or (high is not None and value > high):
            raise ValueError(expected)
        return value

    return parse


def _optional_int(raw: str) -> int | None:
    if raw.strip().lower() in ("", "none"):
        return None
    return _int_range(1)(raw)


def _float(minimum: float = 0.0, strictly_positive: bool = False) -> Callable[[str], float]:
    def parse(raw: str) -> float:
        expected = f"a number {'>' if strictly_positive else '>='} {minimum:g}"
        try:
            value = float(raw)
        except ValueError:
            raise ValueError(expected) from None
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(expected)
        if value < minimum or (strictly_positive and value <= minimum):
            raise ValueError(expected)
        return value

    return parse


KEEP_FOREVER_WORDS = ("never", "forever")


def _retention_days(raw: str) -> float:
    """Days to keep rows; 0, `never` or `forever` means keep them for ever (returned as 0)."""
    if raw.strip().lower() in KEEP_FOREVER_WORDS:
        return 0.0
    try:
        return _float()(raw)
    except ValueError:
        raise ValueError("a number of days >= 0, or never (0 = keep for ever)") from None


def _percent(raw: str) -> float:
    value = _float()(raw)
    if value > 100:
        raise ValueError("a number 0-100")
    return value


def _bool(raw: str) -> bool:
    word = raw.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise ValueError("true or false")


def _choice(options: tuple[str, ...], upper: bool = False) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip().upper() if upper else raw.strip().lower()
        if value not in options:
            raise ValueError("one of " + ", ".join(options))
        return value

    return parse


def _list(raw: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in raw.split(",") if part.strip())


def _path(raw: str) -> Path:
    if not raw.strip():
        raise ValueError("a path")
    return Path(raw).expanduser()


def _url(schemes: tuple[str, ...]) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip()
        if not any(value.startswith(s + "://") or value.startswith(s + ":") for s in schemes):
            raise ValueError("a URL starting with " + " or ".join(f"{s}://" for s in schemes))
        return value

    return parse


def _optional_url(schemes: tuple[str, ...]) -> Callable[[str], str | None]:
    def parse(raw: str) -> str | None:
        return _url(schemes)(raw) if raw.strip() else None

    return parse


# Environment key -> (Settings field, parser). Order is the order of SPEC section 3.
