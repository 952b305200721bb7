"""Exact duplicates (same upright RGB pixels) among images not all decoded at full size.

A JPEG much bigger than its bucket is decoded reduced (see ``images.py``), so its
pixel hash is that of the reduced pixels, while every other image is hashed at
full size. Two copies of one picture must still be found whatever their formats,
and two different pictures must never be taken for copies. The rule, for images
of the same full upright size (copies always share it):

- both hashed at full size: equal hashes;
- both reduced (then at the same scale): equal reduced hashes make them
  candidates, confirmed by hashing both at full size: the reduced pixels come
  from the low DCT frequencies only, and two JPEGs can share those and still
  differ;
- one reduced, one not (a JPEG and, say, a PNG saved from its pixels): the reduced
  one is hashed at full size as soon as an image of its size was hashed at full size.

Hashing at full size means decoding the file again, which happens only for
images whose size meets one of these cases. Records hold no pixels: a reduced
image is remembered with a ``ref`` that ``full_hash(ref)`` decodes again.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable


@dataclasses.dataclass
class _Seen:
    source: str
    order: int
    reduced: tuple[int, str] | None
    """(scale, hash of the reduced pixels), or None when decoded at full size."""
    full: str | None
    """Hash of the full-size pixels, when known."""
    ref: Any = None


@dataclasses.dataclass
class _SizeGroup:
    by_full: dict[str, _Seen] = dataclasses.field(default_factory=dict)
    by_reduced: dict[tuple[int, str], _Seen] = dataclasses.field(default_factory=dict)
    unresolved: list[_Seen] = dataclasses.field(default_factory=list)
    """Reduced images whose full-size hash is not known yet."""
    any_full_size: bool = False
    """Some image of this size was decoded at full size."""


class DuplicateFinder:
    """Remembers every kept image and names the earlier copy of each new one.

    ``full_hash(ref)`` hashes the image behind ``ref`` at full size (decoding it
    again); ``on_full_hash(ref, hash)``, if given, is told each such hash, e.g. to
    remember it for the next run.
    """

    def __init__(self, full_hash: Callable[[Any], str], on_full_hash: Callable[[Any, str], None] | None = None):
        self._full_hash = full_hash
        self._on_full_hash = on_full_hash
        self._groups: dict[tuple[int, int], _SizeGroup] = {}
        self._count = 0

    def first_copy(self, source: str, size: tuple[int, int], pixel_hash: str, scale: int = 1, full_hash: str | None = None, ref: Any = None) -> str | None:
        """The source of an earlier image with the same pixels as this one, or None (then this one is kept).

        ``pixel_hash`` is the hash at ``scale`` (1: full size); ``full_hash`` the full-size
        hash when already known for a reduced image; ``ref`` what ``full_hash()`` needs.
        """
        group = self._groups.setdefault(tuple(size), _SizeGroup())
        reduced = (scale, pixel_hash) if scale != 1 else None
        seen = _Seen(source, self._count, reduced, pixel_hash if reduced is None else full_hash, ref)
        self._count += 1
        match = None
        if reduced is None:
            for earlier in group.unresolved:  # only now comparable with a full-size hash
                self._resolve(earlier, group)
            group.unresolved = []
            match = group.by_full.get(seen.full)
        else:
            if group.any_full_size:
                self._resolve(seen, group, register=False)
                match = group.by_full.get(seen.full)
            twin = group.by_reduced.get(reduced)
            if match is None and twin is not None:
                self._resolve(seen, group, register=False)
                self._resolve(twin, group)
                match = group.by_full.get(seen.full)
        if match is not None:
            return match.source
        self._remember(seen, group)
        return None

    def _resolve(self, seen: _Seen, group: _SizeGroup, register: bool = True) -> None:
        if seen.full is None:
            seen.full = self._full_hash(seen.ref)
            if self._on_full_hash is not None:
                self._on_full_hash(seen.ref, seen.full)
        seen.ref = None  # nothing more to decode: let go of what it pointed at
        if register:
            kept = group.by_full.get(seen.full)
            if kept is None or kept.order > seen.order:
                group.by_full[seen.full] = seen

    def _remember(self, seen: _Seen, group: _SizeGroup) -> None:
        if seen.reduced is None:
            group.any_full_size = True
        else:
            group.by_reduced.setdefault(seen.reduced, seen)
        if seen.full is not None:
            group.by_full.setdefault(seen.full, seen)
            seen.ref = None
        else:
            group.unresolved.append(seen)
