"""WebDataset shards: the sample format, the writer (with a manifest) and `inspect`.

One sample = ``__key__`` + one image (``jpg`` or ``png``) + ``txt`` (the caption, UTF-8) + ``json``
(metadata: ``domain`` = general | medical, ``source`` dataset, ``id`` original id, anything else).
Nothing is pickled. ``manifest.json`` next to the shards lists, per shard file: samples, samples per
domain and source, bytes and sha256.
"""
from __future__ import annotations

import collections
import hashlib
import itertools
import json
import os
import re
from pathlib import Path
from typing import Iterable, Iterator

from msmedcap.batch import DOMAINS
from msmedcap.atomic_files import atomic_write_text

IMAGE_EXTS = ("jpg", "png")
MANIFEST = "manifest.json"


def safe_key(text: str) -> str:
    """A tar-member-safe ``__key__``: webdataset splits member names at the first dot."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", str(text)).strip("_") or "sample"


def check_sample(sample: dict) -> None:
    """Raise ValueError (naming the key) unless ``sample`` follows the shard format."""
    key = sample.get("__key__")
    if not key or safe_key(key) != key:
        raise ValueError(f"sample key {key!r}: must be non-empty and use only [A-Za-z0-9_-]")
    images = [e for e in IMAGE_EXTS if e in sample]
    if len(images) != 1 or not isinstance(sample[images[0]], (bytes, bytearray)):
        raise ValueError(f"sample {key}: needs exactly one image (jpg or png) as bytes")
    if not isinstance(sample.get("txt"), str) or not sample["txt"].strip():
        raise ValueError(f"sample {key}: needs a non-empty txt caption")
    meta = sample.get("json")
    if not isinstance(meta, dict) or meta.get("domain") not in DOMAINS or not meta.get("source"):
        raise ValueError(f"sample {key}: json needs domain in {DOMAINS} and a source")


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_manifest(out_dir: str | Path) -> dict:
    path = Path(out_dir) / MANIFEST
    if not path.is_file():
        return {"shards": {}}
    return json.loads(path.read_text())


def _write_manifest(out_dir: Path, manifest: dict) -> None:
    manifest["shards"] = dict(sorted(manifest["shards"].items()))
    atomic_write_text(out_dir / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True) + "\n")


def write_shards(samples: Iterable[dict], out_dir: str | Path, prefix: str, shard_size: int = 1000,
                 mtime: int | None = None) -> list:
    """Write ``samples`` to ``out_dir/prefix-000.tar, -001, ...`` with webdataset's ShardWriter and
    merge their entries into ``out_dir/manifest.json``. Returns the shard file names written.
    ``mtime`` (an int: a float adds PAX headers) fixes the members' time, for reproducible bytes."""
    import webdataset as wds

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stats: dict = {}
    kw = {"mtime": mtime} if mtime is not None else {}
    with wds.ShardWriter(str(out_dir / f"{prefix}-%03d.tar"), maxcount=shard_size, verbose=0,
                         user="msmedcap", group="msmedcap", **kw) as writer:
        for sample in samples:
            check_sample(sample)
            encoded = dict(sample, json=json.dumps(sample["json"], sort_keys=True).encode())
            writer.write(encoded)
            entry = stats.setdefault(Path(writer.fname).name, {
                "samples": 0, "domains": collections.Counter(), "sources": collections.Counter()})
            entry["samples"] += 1
            entry["domains"][sample["json"]["domain"]] += 1
            entry["sources"][sample["json"]["source"]] += 1
    if not stats:  # ShardWriter opened a first shard before knowing there was nothing to write
        (out_dir / f"{prefix}-000.tar").unlink(missing_ok=True)
        return []
    manifest = read_manifest(out_dir)
    for name, entry in stats.items():
        path = out_dir / name
        manifest["shards"][name] = {
            "samples": entry["samples"], "domains": dict(entry["domains"]), "sources": dict(entry["sources"]),
            "bytes": path.stat().st_size, "sha256": sha256_file(path)}
    _write_manifest(out_dir, manifest)
    return sorted(stats)


# --------------------------------------------------------------------------- inspect
class TruncatedTar(Exception):
    pass


def open_shard(url: str):
    """The one place the loaders open a shard (webdataset's ``gopen``: a local path, ``file:``, ``pipe:``,
    ``http(s):``, ...). Tests count the opens here."""
    from webdataset.gopen import gopen

    return gopen(url)


def _tar_end_problem(stream) -> str | None:
    """'empty' or 'truncated' when a seekable local tar lacks its end-of-archive blocks (Python's
    streaming tar reader ends quietly at a cut between members, so a truncated shard would otherwise
    go unnoticed); None when it has them. Read on the open stream, which is left at offset 0."""
    size = os.fstat(stream.fileno()).st_size
    stream.seek(max(0, size - 1024))
    tail = stream.read()
    stream.seek(0)
    if size == 0 or size % 512 or tail != bytes(1024):
        return "empty" if size == 0 else "truncated"
    return None


def shard_streams(urls: Iterable[str], handler) -> Iterator[dict]:
    """``{"url", "stream"}`` for each shard, each opened once (:func:`open_shard`) and closed when the
    next one is asked for. A local tar without its end-of-archive blocks is reported to ``handler``
    (checked on the same open file); an empty one is reported and dropped. A shard that cannot be
    opened goes to ``handler`` (True: go on with the next one)."""
    from msmedcap.data.shard_spec import is_local_shard

    for url in urls:
        try:
            stream = open_shard(url)
        except Exception as exn:  # noqa: BLE001  webdataset's convention: the handler decides
            exn.args = exn.args + (url,)
            if handler(exn):
                continue
            return
        try:
            problem = None
            if is_local_shard(url) and getattr(stream, "seekable", lambda: False)():
                problem = _tar_end_problem(stream)
            if problem:
                handler(TruncatedTar(f"{url}: {problem} tar"))
            if problem != "empty":
                yield {"url": url, "stream": stream}
        finally:
            stream.close()


def label_sample(raw: dict, domain: str | None, source: str | None) -> dict:
    """Attach a spec's DOMAIN/SOURCE to a raw sample (read by decode.parse_meta; they win over its json)."""
    if domain is not None:
        raw["__domain__"] = domain
    if source is not None:
        raw["__source__"] = source
    return raw


def iter_raw_samples(urls: Iterable[str], handler) -> Iterator[dict]:
    """Raw samples (member bytes by extension) of ``urls`` in order, via webdataset's tar reader; each
    shard opened once (:func:`shard_streams`)."""
    from webdataset.tariterators import group_by_keys, tar_file_expander

    files = tar_file_expander(shard_streams(urls, handler), handler=handler)
    return group_by_keys(files, handler=handler)


# Samples read from a spec's first shard to tell whether its samples carry a domain.
DOMAIN_PROBE_SAMPLES = 16


def check_spec_has_domain(where: str, spec: str, urls: list) -> None:
    """Raise ConfigError naming ``spec`` when the first samples of its first local shard have no
    ``domain`` in their json (shards written by img2dataset and other tools): the loader would skip
    every one of them, forever. Unreadable or empty shards pass (the loader counts those)."""
    from msmedcap.data.shard_spec import is_local_shard
    from msmedcap.errors import ConfigError

    local = [u for u in urls if is_local_shard(u) and os.path.isfile(u)]
    if not local:
        return
    seen, examples = 0, []
    try:
        for raw in itertools.islice(iter_raw_samples(local[:1], _ignore_errors), DOMAIN_PROBE_SAMPLES):
            seen += 1
            try:
                meta = json.loads(raw["json"]) if "json" in raw else None
            except (ValueError, UnicodeDecodeError):
                continue  # a corrupt json is one bad sample, counted by the loader
            if isinstance(meta, dict) and meta.get("domain") in DOMAINS:
                return
            if len(examples) < 2:
                examples.append(f"{raw['__key__']}: " + ("no json member" if meta is None else
                                "json keys " + ", ".join(sorted(meta)[:8]) if isinstance(meta, dict) else "json not an object"))
    except Exception:  # noqa: BLE001  a shard the loader will report as bad_tar
        return
    if seen:
        pattern = spec.split("::")[0]
        raise ConfigError(
            f"{where}: {spec!r}: its samples have no domain ({local[0]}, first {seen} samples; "
            f"{'; '.join(examples)}). Name it in the spec: '{pattern}::1::general' or '{pattern}::1::medical' "
            f"(PATTERN::WEIGHT::DOMAIN[::SOURCE])")


def _ignore_errors(exn: Exception) -> bool:
    return True


def inspect_shards(specs: list) -> dict:
    """Counts per domain and source, bytes, and checksum verification against each shard's manifest.
    Returns {"shards": [...], "domains": {...}, "sources": {...}, "samples", "bytes", "skipped", "problems"}."""
    from msmedcap.data.shard_spec import expand_braces, parse_shard_spec
    from msmedcap.data.decode import SkipCounter, parse_meta

    urls = [(u, parsed) for parsed in map(parse_shard_spec, specs) for u in expand_braces(parsed.pattern)]
    manifests: dict = {}
    report = {"shards": [], "domains": collections.Counter(), "sources": collections.Counter(),
              "samples": 0, "bytes": 0, "problems": []}
    counter = SkipCounter()
    for url, parsed in urls:
        path = Path(url)
        if not path.is_file():
            report["problems"].append(f"{url}: file not found")
            continue
        manifest = manifests.setdefault(path.parent, read_manifest(path.parent))["shards"].get(path.name)
        digest, size = sha256_file(path), path.stat().st_size
        checksum = "no manifest entry" if manifest is None else (
            "ok" if manifest["sha256"] == digest and manifest["bytes"] == size else "MISMATCH")
        if checksum == "MISMATCH":
            report["problems"].append(f"{url}: sha256/bytes differ from {path.parent / MANIFEST}")
        n = 0
        for raw in iter_raw_samples([url], counter.tar_handler):
            meta = counter.attempt(parse_meta, label_sample(raw, parsed.domain, parsed.source))
            if meta is None:
                continue
            n += 1
            report["domains"][meta["domain"]] += 1
            report["sources"][meta["source"]] += 1
        if manifest is not None and manifest["samples"] != n and checksum == "ok":
            report["problems"].append(f"{url}: {n} readable samples, manifest says {manifest['samples']}")
        report["shards"].append({"url": url, "samples": n, "bytes": size, "checksum": checksum})
        report["samples"] += n
        report["bytes"] += size
    report["skipped"] = counter.pop()
    report["domains"], report["sources"] = dict(report["domains"]), dict(report["sources"])
    return report
