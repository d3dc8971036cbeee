"""Media paths named by annotation files stay inside their root.

An annotation row names a video or image relative to a root (`<video_root>/<pth>.mp4`,
`<image_root>/<split entry>`). A name that is absolute or climbs out with `..` would make packing
or evaluation read any file the process can read, so it is refused. The check is on the path as
written (normalised, symlinks not followed): the annotation file is the untrusted input, while
links inside a root were put there by whoever owns the data (data roots are often link farms).
"""

from __future__ import annotations

import os
from pathlib import Path


class UnsafePathError(ValueError):
    """A media name that is absolute or leaves its root."""

    def __init__(self, root: str | Path, name: str):
        self.root, self.name = str(root), str(name)
        super().__init__(f"{name!r} is outside {root} (absolute or climbing out with '..')")


def inside(root: str | Path, name: str) -> Path:
    """`root/name`, or `UnsafePathError` when `name` is empty, absolute or leaves `root`."""
    name = str(name)
    norm = os.path.normpath(name) if name else ""
    if (
        not name
        or "\0" in name
        or os.path.isabs(name)
        or norm in (".", "..")
        or norm.startswith(".." + os.sep)
    ):
        raise UnsafePathError(root, name)
    return Path(root) / norm


def check_inside(root: str | Path, path: str | Path) -> Path:
    """`path` itself when it lies (lexically) inside `root`, else `UnsafePathError`."""
    base, full = os.path.abspath(root), os.path.abspath(path)
    if full == base or os.path.commonpath([base, full]) != base:
        raise UnsafePathError(root, str(path))
    return Path(path)
