"""What a shard set is: its URLs (from a shard spec) and what its `index.json` says (sample counts, class pixels).

A shard spec (`--data.train_shards`, `val_shards`, `token_shards`) is one or more parts separated by `,` or `::`
(commas inside `{...}` belong to the brace pattern), each of them
- a local directory (every `*.tar` in it, sorted), a glob (`data/ade/*.tar`), a path, or `file://` URL;
- a brace pattern, local or not: `https://host/ade-{000000..000511}.tar`;
- an `http(s)://` URL, a `pipe:` command writing the tar to stdout (`pipe:aws s3 cp s3://bucket/a-000001.tar -`,
  `pipe:gsutil cat gs://...`, `pipe:curl -s -L ...`), or any other URL webdataset.gopen opens (gs:, ais:, ...);
- a local `*.txt` file listing one such part per line (blank lines and `#` comments skipped; relative paths are
  relative to the list file).

A shard's name is the last component of its path (for a `pipe:` command: the last `*.tar` word in it); the index
is `index.json` in the same place, read through the same opener as the shards (for a `pipe:` command, the same
command with the shard's name replaced by `index.json`). Local shards missing from their index are counted by
reading their tar headers, with a warning; for streamed shards a missing index is an error naming the URL tried.
"""

from __future__ import annotations

import glob
import json
import os
import posixpath
import re
import warnings
from urllib.parse import urlparse, urlunparse

import braceexpand
import torch

from svq_fast.data.faults import DataFaultWarning
from svq_fast.data.reader import FaultPolicy, count_readable, is_stream, read_bytes
from svq_fast.data.shards import INDEX_NAME

_TAR_WORD = re.compile(r"[^\s/'\"=:]+\.tar\b")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


class MissingIndex(FileNotFoundError):
    """No index.json where one was needed; the message names the URL tried and what to do."""


def _split(spec: str) -> list[str]:
    """Split a spec on `::` and on commas outside braces."""
    parts, depth, cur = [], 0, []
    for part in spec.split("::"):
        for ch in part:
            if ch == "{":
                depth += 1
            elif ch == "}":
                depth = max(0, depth - 1)
            if ch == "," and depth == 0:
                parts.append("".join(cur))
                cur = []
            else:
                cur.append(ch)
        parts.append("".join(cur))
        cur, depth = [], 0
    return [p.strip() for p in parts if p.strip()]


def _local_path(part: str) -> str | None:
    """The local path a spec part names, or None for a stream URL."""
    if part.startswith("file://"):
        return part[len("file://") :]
    if part.startswith("file:"):
        return part[len("file:") :]
    if part.startswith("pipe:") or _SCHEME.match(part):
        return None
    return part


def _expand(part: str, *, in_list: str | None = None) -> list[str]:
    path = _local_path(part)
    if path is None:
        return list(braceexpand.braceexpand(part))
    if in_list is not None and not os.path.isabs(path):
        path = os.path.join(os.path.dirname(in_list), path)
    if os.path.isdir(path):
        return sorted(glob.glob(os.path.join(path, "*.tar")))
    if path.endswith(".txt") and os.path.isfile(path):
        if in_list is not None:
            raise ValueError(f"{in_list}: lists shard list {path}; a shard list names shards, not other lists")
        with open(path) as f:
            lines = [ln.strip() for ln in f]
        return [u for ln in lines if ln and not ln.startswith("#") for u in _expand(ln, in_list=path)]
    if "{" in path:
        return list(braceexpand.braceexpand(path))
    if any(c in path for c in "*?["):
        return sorted(glob.glob(path))
    if not os.path.exists(path):
        raise FileNotFoundError(f"shard {path} not found" + (f" (listed in {in_list})" if in_list else ""))
    return [path]


def list_shards(spec: str) -> list[str]:
    """Shard URLs of a spec (see the module docstring), in order."""
    if not spec:
        raise FileNotFoundError("no shards given (data.train_shards is empty)")
    out = [u for part in _split(spec) for u in _expand(part)]
    if not out:
        raise FileNotFoundError(f"no .tar shards found for {spec!r}")
    return out


def shard_name(url: str) -> str:
    """The shard's file name: the key of its entry in index.json (the same for a local path and a URL of it)."""
    if url.startswith("pipe:"):
        words = _TAR_WORD.findall(url)
        return words[-1] if words else url
    path = _local_path(url)
    if path is not None:
        return os.path.basename(path)
    return posixpath.basename(urlparse(url).path)


def index_url(shard: str) -> str:
    """Where the index of `shard` is: beside it, through the same kind of URL."""
    if shard.startswith("pipe:"):
        name = shard_name(shard)
        if name == shard:
            raise MissingIndex(
                f"cannot tell where the index of {shard!r} is: the command names no *.tar file. Name the shard "
                f"file in the command (its {INDEX_NAME} is then read with the same command)"
            )
        head, _, tail = shard.rpartition(name)
        return head + INDEX_NAME + tail
    path = _local_path(shard)
    if path is not None:
        return os.path.join(os.path.dirname(os.path.abspath(path)), INDEX_NAME)
    pr = urlparse(shard)
    return urlunparse(pr._replace(path=posixpath.join(posixpath.dirname(pr.path), INDEX_NAME), query="", fragment=""))


def read_index(where: str, *, faults: FaultPolicy | None = None) -> dict:
    """The index.json of a local shard directory, or the one beside a shard URL. Raises FileNotFoundError
    (MissingIndex) naming the URL it tried, ValueError for an index that is not JSON."""
    local = _local_path(where)
    if local is not None and os.path.isdir(local):
        return _read_index_at(os.path.join(local, INDEX_NAME), faults)
    return _read_index_at(index_url(where), faults)


def _read_index_at(url: str, faults: FaultPolicy | None) -> dict:
    if not is_stream(url):
        path = _local_path(url)
        if not os.path.exists(path):
            raise MissingIndex(
                f"{path} not found: shards written by `python -m svq_fast.data.make_shards` have an {INDEX_NAME} "
                "beside them (sample counts per shard, class histogram)"
            )
        with open(path, "rb") as f:
            raw = f.read()
    else:
        try:
            raw = read_bytes(url, faults or FaultPolicy())
        except OSError as e:
            raise MissingIndex(
                f"could not read the shard index {url} ({e}). Streamed shards need the {INDEX_NAME} that "
                "make_shards writes beside them (sample counts per shard, class histogram): copy it next to the "
                "shards, where the same opener finds it"
            ) from e
    try:
        return json.loads(raw)
    except ValueError as e:
        raise ValueError(f"{url}: not a JSON shard index ({e})") from e


def _indexes(shards: list[str], faults: FaultPolicy | None) -> dict[str, dict | Exception]:
    """{index URL: its parsed index, or the error reading it} for every index the shards point at."""
    out: dict[str, dict | Exception] = {}
    for s in shards:
        url = index_url(s)
        if url not in out:
            try:
                out[url] = _read_index_at(url, faults)
            except (OSError, ValueError) as e:
                out[url] = e
    return out


def shard_counts(shards: list[str], *, faults: FaultPolicy | None = None) -> list[int]:
    """Samples per shard from the index beside each shard. Local shards it does not list are counted by reading
    their tar headers (with a warning); one that cannot be read to its end (an empty file, random bytes, a cut
    tar: e.g. a stray `.tar` beside the shards) counts its readable samples only, and is named in a
    DataFaultWarning like any other bad shard: the run goes on without it (the loader's bound,
    data.max_bad_fraction, is about samples it has to replace; these are not planned at all). A streamed shard
    without an index entry raises, naming the URLs."""
    indexes = _indexes(shards, faults)
    counts, scanned, bad = [], [], []
    for s in shards:
        index = indexes[index_url(s)]
        listed = [] if isinstance(index, Exception) else index.get("shards", [])
        entries = {e["name"]: int(e["samples"]) for e in listed}
        n = entries.get(shard_name(s))
        if n is None:
            if is_stream(s):
                why = str(index) if isinstance(index, Exception) else f"{index_url(s)} does not list {shard_name(s)}"
                raise MissingIndex(f"no sample count for the streamed shard {s}: {why}")
            n, error = count_readable(s)
            if error:
                bad.append(s)
                warnings.warn(
                    f"svq_fast.data: skipped the rest of the unlisted shard {error}; it is not listed in "
                    f"{index_url(s)}, so only its {n} readable sample(s) are used and the run goes on "
                    f"({len(bad)} such shard(s) so far). Rewrite it with make_shards, or remove it.",
                    DataFaultWarning,
                    stacklevel=2,
                )
            scanned.append(s)
        counts.append(n)
    if scanned:
        warnings.warn(
            f"{len(scanned)} shard(s) not listed in an {INDEX_NAME} (e.g. {scanned[0]}): counted their samples by "
            "scanning the tar headers; write shards with make_shards to get an index",
            stacklevel=2,
        )
    return counts


def class_pixel_counts(
    shards: list[str], num_classes: int, ignore_index: int = 255, *, faults: FaultPolicy | None = None
) -> torch.Tensor:
    """(num_classes,) float64 pixel counts summed over the class_histogram of every index the shards point at.

    An index's histogram covers all of its shards, also when the shard list names only some of them."""
    counts = torch.zeros(num_classes, dtype=torch.float64)
    for url, index in sorted(_indexes(shards, faults).items()):
        try:
            if isinstance(index, Exception):
                raise index
            histogram = index["class_histogram"]
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(
                f"semantic class balancing needs the class_histogram of {url} ({type(e).__name__}: {e}); "
                "write the shards with `python -m svq_fast.data.make_shards` or set loss.semantic_class_balance=0"
            ) from e
        for key, n in histogram.items():
            cls = int(key)
            if cls == ignore_index:
                continue
            if not 0 <= cls < num_classes:
                raise ValueError(f"{url}: class_histogram has class id {cls}, outside the model's 0..{num_classes - 1}")
            counts[cls] += float(n)
    if counts.sum() <= 0:
        raise ValueError(f"semantic class balancing: the class histograms of {len(shards)} shard(s) count no pixels")
    return counts
