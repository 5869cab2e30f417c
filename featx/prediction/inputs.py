"""The images to predict: files, folders (searched recursively) and CSV files, in the order given.

Prediction needs no labels, so a folder is any folder of images (class sub-folders or not) and a
CSV file needs only its path column. Each image has two names: ``path``, where the file is as seen
from the working directory, and ``id``, the name featx's datasets give it (the path inside a
folder, the path as a CSV row writes it, a file's path as given), so predictions join with the ids
of a ``folder:`` or ``csv:`` cache entry.

Paths named directly that do not exist are refused (a typo should not cost a model load); files
a CSV file lists but that are missing become rows with an error, as extraction records them.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ..data.sources import _COLUMNS, IMAGE_EXTENSIONS, _list_images, _read_csv
from ..errors import UsageError

HOW = ("Give image files, folders of images (searched recursively; folder:PATH works too) or CSV files with a "
       "path column (csv:FILE works too).")


@dataclass(frozen=True)
class ImageList:
    """Images in the order they were given: ``ids[i]`` names ``paths[i]``."""

    ids: tuple[str, ...]
    paths: tuple[Path, ...]

    def __len__(self) -> int:
        return len(self.ids)


def collect_images(items: str | os.PathLike | Iterable[str | os.PathLike]) -> ImageList:
    """Every image ``items`` name: image files, folders, CSV files (``folder:``/``csv:`` prefixes allowed)."""
    if isinstance(items, (str, os.PathLike)):
        items = [items]
    items = list(items)
    if not items:
        raise UsageError(f"No images given. {HOW}")
    ids: list[str] = []
    paths: list[Path] = []
    missing = []
    for item in items:
        text = os.fspath(item)
        kind, _, rest = text.partition(":")
        forced = kind if rest and kind in ("folder", "csv") else None
        given = Path(rest if forced else text).expanduser()
        if not given.exists():
            missing.append(text)
        elif forced == "folder" or (forced is None and given.is_dir()):
            found = _folder(given)
            ids += [i for i, _ in found]
            paths += [p for _, p in found]
        elif forced == "csv" or given.suffix.lower() == ".csv":
            found = _csv(given)
            ids += [i for i, _ in found]
            paths += [p for _, p in found]
        else:
            ids.append(text)
            paths.append(given)
    if missing:
        shown = ", ".join(repr(m) for m in missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise UsageError(f"Image path(s) not found: {shown}. {HOW}")
    return ImageList(tuple(ids), tuple(paths))


def _folder(root: Path) -> list[tuple[str, Path]]:
    if not root.is_dir():
        raise UsageError(f"{str(root)!r} is not a folder. {HOW}")
    files = _list_images(root, [])
    if not files:
        raise UsageError(f"No images found in {root} (searched recursively for files ending in "
                         f"{', '.join(IMAGE_EXTENSIONS)}; hidden files and folders are skipped).")
    return [(f.relative_to(root).as_posix(), f) for f in files]


def _csv(file: Path) -> list[tuple[str, Path]]:
    """(id, path) of each row: the path column of a header (path, file, filename or image), else the
    first column; other columns (label, split, anything) are ignored."""
    if not file.is_file():
        raise UsageError(f"CSV file {str(file)!r} is not a file. {HOW}")
    rows = _read_csv(file)  # UTF-8 checked, blank rows dropped
    if not rows:
        raise UsageError(f"CSV file {file} has no rows. It needs a path column: one image path per row.")
    first = [c.strip().lower() for c in rows[0][1]]
    mapped = [_COLUMNS.get(c) for c in first]
    column = 0
    if "path" in mapped:
        column, rows = mapped.index("path"), rows[1:]
    elif any(mapped) or not _looks_like_image(file, rows[0][1][0]):
        raise UsageError(
            f"CSV file {file}: the first row ({','.join(c.strip() for c in rows[0][1])}) looks like a header "
            "without a path column. Name the column of image paths 'path' (or 'file', 'filename', 'image'), "
            "or drop the header and put the paths in the first column."
        )
    found = []
    for lineno, row in rows:
        rel = row[column].strip() if column < len(row) else ""
        if not rel:
            raise UsageError(f"CSV file {file}, row {lineno}: no path (the path column is empty). Every row needs "
                             "an image path.")
        p = Path(rel)
        found.append((rel, p if p.is_absolute() else file.parent / p))
    return found


def _looks_like_image(file: Path, cell: str) -> bool:
    path = Path(cell.strip())
    return path.suffix.lower() in IMAGE_EXTENSIONS or (file.parent / path).is_file()
