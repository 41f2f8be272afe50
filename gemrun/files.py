"""Files read from a model directory: inside it once symlinks are resolved (a link to another file of the
directory is fine, one to `/etc/passwd` is not), and regular files (reading a FIFO or a device blocks or never
ends). A Hugging Face cache snapshot (`models--org--name/snapshots/REV/`) links its files to the repository's
`blobs/`, which therefore counts as inside."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import GemrunError, WeightsError


def model_file(root: Path, name: str, error: type[GemrunError] = WeightsError, what: str = "file") -> Path | None:
    """`root / name` resolved, or None when nothing has that name; `error` when it leaves the directory or is not
    a regular file (a dangling link included)."""
    path = root / name
    if not path.is_symlink() and not path.exists():
        return None
    real, base = path.resolve(), root.resolve()
    allowed = [base]
    if base.parent.name == "snapshots":
        allowed.append(base.parent.parent / "blobs")
    if not any(d in real.parents for d in allowed):
        raise error(f"{what} {name!r} in {root} points outside the model directory")
    if not real.is_file():
        raise error(f"{what} {name!r} in {root} is missing or not a regular file")
    return real


def json_file(root: Path, name: str) -> dict | None:
    """A model directory's JSON file as an object (None when there is none)."""
    path = model_file(root, name)
    if path is None:
        return None
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise WeightsError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise WeightsError(f"{path} is not a JSON object")
    return raw


def config_json(root: Path) -> dict:
    """An HF directory's `config.json` (`auto_map` / `trust_remote_code` in it are never looked at)."""
    raw = json_file(root, "config.json")
    if raw is None:
        raise WeightsError(f"{root} has no config.json")
    return raw
