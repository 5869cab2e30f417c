"""WebDataset tar shards (``wds:PATTERN``), read by position without unpacking.

A WebDataset is streamed by design, but featx needs to know every label up front (stratified
``--limit``, splits) and to hand any sample to any DataLoader worker. So the shards are indexed
once when the dataset is opened: one pass over the tar headers (``tarfile`` seeks over the
data, reading only the headers and the small ``.cls`` members), which records where each
image's bytes are; a worker then reads those bytes with one seek and one read. The index is a
few numpy arrays, cheap to pickle to workers. Samples are named and grouped exactly as
``webdataset`` groups them: its brace expansion for the shard list (``train-{000..003}.tar``),
its split of a member name into key and extension, files of one sample adjacent in the tar,
``__name__`` metadata files skipped.

Conventions (those of WebDataset classification sets such as the clip_benchmark ones):
``KEY.jpg|jpeg|png|webp`` holds the image, ``KEY.cls`` the class index as decimal text, and
``classnames.txt`` (or ``classes.txt``) next to the shards, one name per line, names the
classes; without it the class names are the distinct ``.cls`` values. Split names come from the
shard paths (``train-000.tar``, ``val/0003.tar``).
"""

from __future__ import annotations

import glob
import logging
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UsageError
from .images import ImageDecodeError, ImageReadError, read_with_retry
from .optional import require
from .packed import PackedSource, warn_problems
from .sources import _SPLIT_DIRS, _natural_sorted

log = logging.getLogger(__name__)

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
LABEL_KEY = "cls"
CLASS_FILES = ("classnames.txt", "classes.txt")
#: leading bytes of compressed tars: their members cannot be read by offset
COMPRESSION = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd"}
MAX_LABEL_BYTES = 64


@dataclass
class _Sample:
    key: str
    members: dict[str, tuple[int, int]]  # extension -> (offset of the data, size)


class ShardSource(PackedSource):
    """Samples of WebDataset tar shards; sample ``i`` is ``size[i]`` bytes at ``offset[i]`` of shard ``shard[i]``
    (``offset`` -1: the sample has no image)."""

    def __init__(self, spec, root, shards, shard, offset, size, extension, ids, labels, splits, classes, problems,
                 hash_content=False):
        super().__init__(spec, root, shards, ids, labels, splits, classes, problems, hash_content)
        self.shard = np.asarray(shard, dtype=np.int32)
        self.offset = np.asarray(offset, dtype=np.int64)
        self.size = np.asarray(size, dtype=np.int64)
        self.extension = np.asarray(extension, dtype=object)

    def location(self, i: int) -> str:
        shard = self.containers[self.shard[i]]
        key = str(self.ids[i])[len(shard.relative_to(self.root).as_posix()) + 1:]
        return f"{shard}:{key}.{self.extension[i] or '*'}"

    def encoded(self, i: int) -> bytes:
        if self.offset[i] < 0:
            raise ImageDecodeError("no image in the sample")
        path, offset, size = self.containers[self.shard[i]], int(self.offset[i]), int(self.size[i])

        def read() -> bytes:
            with open(path, "rb") as fh:
                fh.seek(offset)
                return fh.read(size)

        data = read_with_retry(read, self.location(i))
        if len(data) != size:
            raise ImageReadError(f"Could not read {self.location(i)}: the shard is shorter than when it was opened "
                                 "(it changed during the run). Run the same command again.")
        return data


def load_wds(pattern: str, hash_content: bool = False) -> ShardSource:
    require("webdataset", "wds: (WebDataset shards)")
    shards = expand_shards(pattern)
    root = Path(os.path.commonpath([p.parent for p in shards]))
    shard_splits = _shard_splits(shards, root)
    class_names, names_file = _class_names(root)

    shard_of, offsets, sizes, extensions, ids, raw_labels, splits = [], [], [], [], [], [], []
    problems: dict[int, str] = {}
    for s, shard in enumerate(shards):
        relative = shard.relative_to(root).as_posix()
        with open(shard, "rb") as fh:
            for sample in _samples(shard, fh):
                i = len(ids)
                ids.append(f"{relative}/{sample.key}")
                shard_of.append(s)
                splits.append(shard_splits[s])
                found = [ext for ext in IMAGE_KEYS if ext in sample.members]
                if len(found) > 1:
                    raise UsageError(
                        f"Shard {shard}, sample {sample.key!r} holds {len(found)} images "
                        f"({', '.join('.' + e for e in found)}); featx cannot tell which one is the sample's image. "
                        "Keep one image per sample."
                    )
                extensions.append(found[0] if found else "")
                offset, size = sample.members[found[0]] if found else (-1, 0)
                offsets.append(offset)
                sizes.append(size)
                label, problem = _read_label(fh, sample.members.get(LABEL_KEY), class_names)
                raw_labels.append(label)
                if not found:
                    keys = ", ".join("." + e for e in sorted(sample.members)) or "none"
                    problem = (f"no image in the sample (keys: {keys}; featx reads "
                               f"{', '.join('.' + e for e in IMAGE_KEYS)})")
                if problem:
                    problems[i] = problem
    if not ids:
        raise UsageError(f"The shards of wds:{pattern} hold no samples ({len(shards)} tar file(s), no member "
                         "named KEY.EXT).")

    if class_names is not None:
        classes = class_names
        labels = [-1 if lab is None else lab for lab in raw_labels]
        log.info("class names of wds:%s from %s", pattern, names_file)
    else:
        classes = _natural_sorted(str(lab) for lab in raw_labels if lab is not None)
        index = {c: k for k, c in enumerate(classes)}
        labels = [-1 if lab is None else index[str(lab)] for lab in raw_labels]
    labels = [-1 if i in problems else lab for i, lab in enumerate(labels)]
    where = f"wds:{pattern}"
    warn_problems(where, ids, problems, "have no image or an invalid .cls label")
    unlabelled = [i for i, lab in enumerate(raw_labels) if lab is None and i not in problems]
    if unlabelled:
        log.warning("%s: %d sample(s) have no .cls member and are kept as unlabelled (-1), not probed: %s%s",
                    where, len(unlabelled), ", ".join(ids[i] for i in unlabelled[:5]),
                    " ..." if len(unlabelled) > 5 else "")
    spec = "wds:" + "::".join(os.path.abspath(os.path.expanduser(part)) for part in pattern.strip().split("::"))
    return ShardSource(spec, root, shards, shard_of, offsets, sizes, extensions, ids, labels, splits, classes,
                       problems, hash_content=hash_content)


# --------------------------------------------------------------------------- the shard list


def expand_shards(pattern: str) -> list[Path]:
    """Local tar files named by ``pattern``: webdataset's brace and ``::`` expansion, then shell-style
    globs (``*``, ``?``, ``[...]``, ``**``); sorted, so that the order of a pattern does not change
    the dataset."""
    from webdataset.shardlists import expand_urls

    pattern = pattern.strip()
    if not pattern:
        raise UsageError("wds: needs a tar file or a pattern, e.g. wds:shards/train-{000..003}.tar or "
                         "wds:'shards/*.tar'.")
    found: dict[Path, None] = {}
    missing: list[str] = []
    for name in expand_urls(pattern):
        if re.match(r"^[a-z][a-z0-9+.-]*:", name) and not Path(name).exists():
            raise UsageError(
                f"wds:{pattern}: {name!r} is not a local file. featx reads shards by position, so they must be on "
                "this machine; download them first (e.g. with curl, aws s3 cp or gsutil cp)."
            )
        name = os.path.expanduser(name)
        if glob.has_magic(name):
            matches = sorted(p for p in glob.glob(name, recursive=True) if _looks_like_tar(p) and os.path.isfile(p))
            if not matches:
                raise UsageError(
                    f"wds:{pattern}: {name!r} matches no tar file. Check the path; shards are files ending in .tar "
                    "(quote the pattern so that the shell does not expand it)."
                )
            found.update((Path(m).resolve(), None) for m in matches)
        elif os.path.isfile(name):
            found[Path(name).resolve()] = None
        else:
            missing.append(name)
    if missing:
        raise UsageError(
            f"wds:{pattern}: {len(missing)} shard(s) do not exist: {', '.join(missing[:5])}"
            f"{' ...' if len(missing) > 5 else ''}. Brace ranges such as train-{{000..003}}.tar name every shard "
            "in the range; use a glob (train-*.tar) to take the ones that exist."
        )
    return sorted(found)


def _looks_like_tar(name: str) -> bool:
    base = os.path.basename(name).lower()
    return ".tar" in base or base.endswith(".tgz")


def _shard_splits(shards: list[Path], root: Path) -> list[str]:
    """Each shard's split from the words of its path below ``root`` (``train-000.tar``, ``val/0.tar``):
    all shards have one or none do, as CSV splits."""
    splits = []
    for shard in shards:
        parts = shard.relative_to(root).parts
        words = [d.lower() for d in parts[:-1]] + re.split(r"[^a-z0-9]+", parts[-1].lower())
        named = sorted({_SPLIT_DIRS[w] for w in words if w in _SPLIT_DIRS})
        if len(named) > 1:
            raise UsageError(
                f"Shard {shard} is named after several splits ({', '.join(named)}); featx takes the split from "
                "the shard's path (train-000.tar, val/0.tar). Rename the shard or its folder."
            )
        splits.append(named[0] if named else "")
    without = [s for s, split in zip(shards, splits) if not split]
    if without and len(without) < len(shards):
        raise UsageError(
            f"{len(without)} shard(s) have no split in their name ({', '.join(p.name for p in without[:5])}) while "
            "the others do. Name every shard after its split (train, val, test), or none of them."
        )
    return splits


def _class_names(root: Path) -> tuple[list[str] | None, Path | None]:
    """Names from ``classnames.txt`` (or ``classes.txt``) beside the shards, or in the folder above a
    split folder (``ds/classnames.txt`` for ``ds/train/*.tar``)."""
    folders = [root] + ([root.parent] if root.name.lower() in _SPLIT_DIRS else [])
    for folder in folders:
        for name in CLASS_FILES:
            path = folder / name
            if path.is_file():
                return _read_class_file(path), path
    return None, None


def _read_class_file(path: Path) -> list[str]:
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError:
        raise UsageError(f"Class names file {path} is not UTF-8 text.") from None
    while lines and not lines[-1].strip():
        lines.pop()
    names = [line.strip() for line in lines]
    if not names or "" in names:
        raise UsageError(f"Class names file {path}: line {names.index('') + 1 if names else 1} is empty. Write one "
                         "class name per line, the name of class 0 first.")
    doubled = sorted({n for n in names if names.count(n) > 1})
    if doubled:
        raise UsageError(f"Class names file {path} lists {', '.join(map(repr, doubled[:5]))} more than once; each "
                         "class needs its own name.")
    return names


# --------------------------------------------------------------------------- the index


def _samples(shard: Path, fh):
    """The samples of one shard in order, grouped as webdataset groups them: consecutive members with
    the same key (``base_plus_ext``), extensions lower-cased, ``__meta__`` files skipped."""
    from webdataset.tariterators import base_plus_ext

    head = fh.read(8)
    fh.seek(0)
    for magic, kind in COMPRESSION.items():
        if head.startswith(magic):
            raise UsageError(
                f"Shard {shard} is {kind}-compressed. featx reads each image at its position in the tar, which "
                f"needs an uncompressed tar: decompress the shards (e.g. `{_decompressor(kind)} {shard.name}`) and "
                "use the .tar files; images are compressed already, so they stay about the same size."
            )
    current: _Sample | None = None
    seen: set[str] = set()
    try:
        tar = tarfile.open(fileobj=fh, mode="r:")
        for member in tar:
            if not member.isreg() or _is_meta(member.name):
                continue
            key, extension = base_plus_ext(member.name)
            if key is None:
                continue
            extension = extension.lower()
            if current is None or key != current.key:
                if current is not None:
                    yield current
                if key in seen:
                    raise UsageError(
                        f"Shard {shard}: the files of sample {key!r} are not next to each other in the tar "
                        f"(found again at member {member.name!r}). WebDataset reads a sample's files only when "
                        "they are adjacent; write each sample's files together (e.g. with webdataset.TarWriter)."
                    )
                seen.add(key)
                current = _Sample(key, {})
            if extension in current.members:
                raise UsageError(f"Shard {shard}: sample {key!r} has two members ending in .{extension}.")
            current.members[extension] = (member.offset_data, member.size)
            tar.members = []  # the index keeps what it needs; a large shard's headers are not held
    except tarfile.TarError as exc:
        raise UsageError(f"Shard {shard} is not a readable tar file ({exc}). Rewrite or remove it.") from None
    if current is not None:
        yield current


def _is_meta(name: str) -> bool:
    first = name.split("/", 1)[0]
    return len(first) > 4 and first.startswith("__") and first.endswith("__")


def _decompressor(kind: str) -> str:
    return {"gzip": "gunzip -k", "bzip2": "bunzip2 -k", "xz": "unxz -k", "zstd": "unzstd"}[kind]


def _read_label(fh, member: tuple[int, int] | None, class_names: list[str] | None) -> tuple[int | None, str]:
    """(class index or None when the sample has no .cls, problem or "")."""
    if member is None:
        return None, ""
    offset, size = member
    if size > MAX_LABEL_BYTES:
        return None, f"invalid label: the .cls member has {size} bytes, not a class index"
    position = fh.tell()
    fh.seek(offset)
    raw = fh.read(size)
    fh.seek(position)
    try:
        text = raw.decode("ascii").strip()
        value = int(text)
    except (UnicodeDecodeError, ValueError):
        return None, f"invalid label: .cls holds {raw[:20]!r}, not a class index (decimal integer)"
    if value < 0:
        return None, f"invalid label: .cls is {value}; class indices start at 0"
    if class_names is not None and value >= len(class_names):
        return None, f"invalid label: .cls is {value}, but the class names file lists {len(class_names)} classes"
    return value, ""
