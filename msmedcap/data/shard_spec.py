"""The shard-spec format of ``data.train`` / ``data.eval`` entries, ``PATTERN[::WEIGHT[::DOMAIN[::SOURCE]]]``:
parsing, brace expansion, and the check that local shards exist."""
from __future__ import annotations

import os
import typing
from typing import Optional

from msmedcap.batch import DOMAINS
from msmedcap.errors import ConfigError


def expand_braces(pattern: str) -> list:
    """webdataset's brace expansion (``{000..003}``, ``{a,b}``)."""
    import braceexpand

    return list(braceexpand.braceexpand(pattern))


class ShardSpec(typing.NamedTuple):
    """One ``data.train`` / ``data.eval`` entry: ``PATTERN[::WEIGHT[::DOMAIN[::SOURCE]]]``."""
    pattern: str
    weight: float = 1.0
    domain: Optional[str] = None  # general | medical: the domain of every sample (wins over the sample's json)
    source: Optional[str] = None  # the source name of every sample (wins over the sample's json)


def parse_shard_spec(spec: str) -> ShardSpec:
    """``"cc-{000..331}.tar::2::general::cc3m"`` -> ShardSpec(pattern, 2.0, "general", "cc3m").

    Fields after the pattern, separated by ``::``, all optional from the right: WEIGHT (a number > 0;
    empty = 1), DOMAIN (general | medical; empty = each sample's json says), SOURCE (a name; empty =
    each sample's json says). A DOMAIN or SOURCE given here wins over the samples' own metadata, so
    shards written by other tools (img2dataset: no domain) train as they are."""
    if not isinstance(spec, str) or not spec:
        raise ConfigError(f"shard spec {spec!r}: expected 'PATTERN[::WEIGHT[::DOMAIN[::SOURCE]]]'")
    pattern, *fields = spec.split("::")
    if len(fields) > 3:
        raise ConfigError(f"shard spec {spec!r}: at most PATTERN::WEIGHT::DOMAIN::SOURCE ({len(fields) + 1} fields)")
    weight, domain, source = (fields + ["", "", ""])[:3]
    if not pattern:
        raise ConfigError(f"shard spec {spec!r}: no pattern before '::'")
    if weight.strip():
        try:
            w = float(weight)
        except ValueError:
            raise ConfigError(f"shard spec {spec!r}: weight {weight!r} is not a number") from None
        if not w > 0:
            raise ConfigError(f"shard spec {spec!r}: weight must be > 0")
    else:
        w = 1.0
    domain, source = domain.strip() or None, source.strip() or None
    if domain is not None and domain not in DOMAINS:
        raise ConfigError(f"shard spec {spec!r}: domain {domain!r} is not one of {DOMAINS}")
    return ShardSpec(pattern, w, domain, source)


def split_weighted_spec(spec: str) -> tuple:
    """``"path-{0..3}.tar::2.5"`` -> (pattern, 2.5); the DOMAIN/SOURCE fields are accepted and dropped
    (see :func:`parse_shard_spec`)."""
    parsed = parse_shard_spec(spec)
    return parsed.pattern, parsed.weight


def is_local_shard(url: str) -> bool:
    """A shard address that names a file on this machine (not a URL, not a ``pipe:`` command)."""
    return "://" not in url and not url.startswith("pipe:")


def check_local_shards(key: str, specs: list, hint: str = "") -> None:
    """Every local shard of ``specs`` exists (a missing one would only be counted as skipped); ``hint``
    ends the message."""
    if not specs:
        raise ConfigError(f"{key}: no shards given")
    for spec in specs:
        for path in expand_braces(split_weighted_spec(spec)[0]):
            if is_local_shard(path) and not os.path.isfile(path):
                raise ConfigError(f"{key}: shard file not found: {path} (from {spec!r}){hint}")
