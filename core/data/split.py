"""Split strings in the `datasets` style: "train", "train[:1000]", "train[10%:20%]", "[-50:]"."""

from __future__ import annotations

import re
from dataclasses import dataclass

from core.errors import UsageError

_SPLIT = re.compile(r"^(?P<name>[\w.-]*)(?:\[(?P<start>-?\d+%?)?:(?P<stop>-?\d+%?)?\])?$")


@dataclass(frozen=True)
class SplitSpec:
    name: str | None  # None: the source's default split
    start: str | None = None  # "10", "-5", "10%"
    stop: str | None = None

    def positions(self, n: int) -> range:
        """Row positions selected out of `n` rows (percentages round to the nearest row)."""
        return range(n)[slice(_bound(self.start, n), _bound(self.stop, n))]


def _bound(text: str | None, n: int) -> int | None:
    if text is None:
        return None
    if text.endswith("%"):
        return int(round(n * int(text[:-1]) / 100))
    return int(text)


def parse_split(split: str | None) -> SplitSpec:
    if split is None or not split.strip():
        return SplitSpec(name=None)
    m = _SPLIT.match(split.strip())
    if not m:
        raise UsageError(f"cannot read the split {split!r}",
                         hint="use a name with an optional slice: train, train[:1000], train[10%:20%]")
    for part in (m["start"], m["stop"]):
        if part and part.endswith("%") and not -100 <= int(part[:-1]) <= 100:
            raise UsageError(f"split {split!r}: a percentage must be between -100% and 100%")
    return SplitSpec(name=m["name"] or None, start=m["start"], stop=m["stop"])
