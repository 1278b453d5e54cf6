"""How attribute values are stored: one JSON document per attribute, as a field of a Redis hash.

Every store uses this one encoding, so a value that would not survive the trip
to Redis fails on the `local` store too, and a scenario compares topologies,
not two different session semantics.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any


def encode_attributes(changed: Mapping[str, Any]) -> dict[str, str]:
    """Each attribute as compact JSON; TypeError naming the attribute that is not JSON-serialisable."""
    encoded: dict[str, str] = {}
    for key, value in changed.items():
        try:
            # allow_nan=False: NaN and Infinity are not JSON (RFC 8259), so no other reader could decode them.
            encoded[key] = json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        except (TypeError, ValueError) as exc:  # ValueError: NaN or a circular reference
            raise TypeError(f"session attribute {key!r} is not JSON-serialisable: {exc}") from exc
    return encoded


def decode_attributes(fields: Mapping[str, str]) -> dict[str, Any]:
    """The attributes of a stored session; ValueError if a field is not JSON (never an empty session)."""
    try:
        return {key: json.loads(raw) for key, raw in fields.items()}
    except json.JSONDecodeError as exc:
        raise ValueError(f"a stored session attribute is not JSON ({exc}); was it written by another program?") from exc
