"""How a domain's listing is cut into shards: consecutive groups of inputs, group g becoming
shard g, so a shard's contents depend only on the listing and the settings, never on timing."""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass
from typing import Iterable, Iterator

from pipeline.images import MAX_PIXELS, MIN_SIDE
from pipeline.layout import FORMAT_VERSION
from pipeline.sources import Input

MB = 1024 * 1024


@dataclass(frozen=True)
class Settings:
    min_side: int = MIN_SIDE
    max_pixels: int = MAX_PIXELS
    shard_size: int = 256 * MB  # bytes of input per shard (approximate)
    max_per_shard: int | None = None
    max_file_bytes: int = 256 * MB  # larger inputs are quarantined unread

    def limits(self) -> dict:
        """What decides whether an input is stored (recorded with each shard)."""
        return {"min_side": self.min_side, "max_pixels": self.max_pixels, "max_file_bytes": self.max_file_bytes}


@dataclass
class Group:
    """The inputs that become one shard."""

    domain: str
    number: int
    inputs: list[Input]
    fingerprint: str = ""


def plan_groups(domain: str, inputs: Iterable[Input], settings: Settings) -> Iterator[Group]:
    """Cut a listing into consecutive groups of at most `shard_size` input bytes and
    `max_per_shard` inputs; each carries a fingerprint of what makes it."""
    limit_n = settings.max_per_shard or sys.maxsize
    batch, size, number = [], 0, 0
    for item in inputs:
        s = max(item.size, 0)
        if batch and (size + s > settings.shard_size or len(batch) >= limit_n):
            yield _finish_group(domain, number, batch, settings)
            batch, size, number = [], 0, number + 1
        batch.append(item)
        size += s
    if batch:
        yield _finish_group(domain, number, batch, settings)


def _finish_group(domain: str, number: int, batch: list[Input], settings: Settings) -> Group:
    h = hashlib.sha256(json.dumps([FORMAT_VERSION, domain, number, settings.limits()], sort_keys=True).encode())
    for item in batch:
        h.update(f"\n{item.path}\0{item.size}".encode("utf-8", "surrogateescape"))
    return Group(domain, number, batch, h.hexdigest())
