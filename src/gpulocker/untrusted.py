"""Reading what a user sent: JSON that cannot be made to crash a reader.

Python's json parser recurses, so a body of ten thousand `[` raises RecursionError (a 500
on the web, a dead connection thread on the socket), and anything that walks a deep value
afterwards recurses again. Every surface parses through `parse_json`, which turns any of
that into one `Invalid` (SPEC §12: bad input never yields a 500, however deep or large).
"""

from __future__ import annotations

import json
from typing import Any

from gpulocker.errors import Invalid

MAX_DEPTH = 16  # no request of ours nests deeper than a few levels


def parse_json(raw: bytes | str, max_depth: int = MAX_DEPTH) -> Any:
    """The JSON value in `raw`, or Invalid when it is not JSON or nests too deeply."""
    try:
        value = json.loads(raw)
    except RecursionError:
        raise Invalid(f"JSON nested deeper than {max_depth} levels") from None
    except (ValueError, UnicodeDecodeError):
        raise Invalid("not valid JSON") from None
    if _depth_exceeds(value, max_depth):
        raise Invalid(f"JSON nested deeper than {max_depth} levels")
    return value


def _depth_exceeds(value: Any, max_depth: int) -> bool:
    """Whether `value` nests containers deeper than `max_depth` (walked without recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children = list(item.values())
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > max_depth:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False
