"""The architecture stays as declared: import layers (pyproject.toml's import-linter contract) and the model
families kept in their own files."""

from __future__ import annotations

import io
import re
import shutil
import subprocess
import sys
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_import_layers():
    exe = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    out = subprocess.run([exe, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]


def test_families_stay_in_their_files():
    """Family checks (Gemma 3 vs Gemma 4) live in model/, formats/, weights/, config.py and the family's own
    processing file; everything above asks the format or the media input what they can do. Names and word-like
    string literals ("gemma4") count; prose (docstrings, help texts) and comments do not."""
    allowed = ("model/", "formats/", "weights/", "config.py", "processing/gemma4.py")
    pattern = re.compile(r"gemma.?4", re.IGNORECASE)
    offenders = []
    for path in sorted((ROOT / "gemrun").rglob("*.py")):
        rel = path.relative_to(ROOT / "gemrun").as_posix()
        if rel.startswith(allowed):
            continue
        for t in tokenize.generate_tokens(io.StringIO(path.read_text()).readline):
            code = t.type == tokenize.NAME or (t.type == tokenize.STRING and " " not in t.string)
            if code and pattern.search(t.string):
                offenders.append(f"{rel}:{t.start[0]}: {t.string}")
    assert not offenders, offenders
