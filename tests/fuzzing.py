"""How many inputs the fuzz tests tried, reported at the end of the run (see tests/conftest.py)."""

from __future__ import annotations

from collections import Counter

FUZZ_COUNTS: Counter[str] = Counter()
