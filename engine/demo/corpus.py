"""Find the demo model's training text on the machine it runs on.

Only two sources, both already on any machine that has Python: the running interpreter's standard
library and the Python files of permissively licensed distributions in its site-packages. Licences are
read from each distribution's metadata; anything not clearly permissive is skipped, and the packages
used are recorded (name, version, licence) for the model card.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import random
import re
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

# Held out for evaluation by module file name; all are present (as plain .py) in 3.10-3.13.
HELD_OUT = (
    "textwrap.py",
    "fractions.py",
    "statistics.py",
    "shlex.py",
    "heapq.py",
    "bisect.py",
    "colorsys.py",
    "calendar.py",
)

# Test suites are used (plain, idiomatic code, and the fresh text a long run needs), except the held-out
# modules' own tests, which quote their lines: `test_<module>` as a file or a folder, anywhere.
HELD_OUT_TESTS = frozenset(f"test_{name[:-3]}" for name in HELD_OUT)

# Folders never used: IDLE, generated or vendored code (vendored code has its own licences).
SKIP_DIRS = {
    "idlelib",
    "lib2to3",
    "site-packages",
    "dist-packages",
    "__pycache__",
    "_vendor",
    "vendor",
    "vendored",
    "_vendored",
    "third_party",
    "extern",
    "_bundled",
    "encodings",
    "pydoc_data",
    "turtledemo",
}
_LETTERS = bytes(range(65, 91)) + bytes(range(97, 123))
MAX_FILE_BYTES = 200_000
MIN_FILE_BYTES = 200

PERMISSIVE = {
    "mit": "MIT",
    "bsd": "BSD",
    "apache": "Apache-2.0",
    "psf": "PSF",
    "python software foundation": "PSF",
    "isc": "ISC",
    "unlicense": "Unlicense",
    "0bsd": "0BSD",
    "zlib": "Zlib",
    "cc0": "CC0-1.0",
    "hpnd": "HPND",
    "bsl-1.0": "BSL-1.0",
    "boost": "BSL-1.0",
    "cnri-python": "CNRI-Python",
}
NEUTRAL_CLASSIFIERS = ("osi approved", "dfsg approved")
SKIP_DISTS = {"codellama-tui"}  # this project itself (an editable install in development checkouts)
COPYLEFT = ("gpl", "gnu", "mpl", "mozilla", "epl", "eclipse", "cddl", "proprietary", "commercial", "sspl")


@dataclass
class SourceFile:
    """One training or held-out file, with where it came from."""

    path: Path
    text: str
    origin: str  # "stdlib" or the distribution name


@dataclass
class Corpus:
    """The collected text plus what the model card needs to say about it."""

    train: list[SourceFile]
    held_out: list[SourceFile]
    packages: list[dict[str, str]] = field(default_factory=list)
    stdlib_version: str = ""
    stats: dict[str, int] = field(default_factory=dict)


def classify_license(meta: md.PackageMetadata) -> str | None:
    """A short permissive licence name for a distribution, or None when unknown or not permissive.

    Reads `License-Expression` (SPDX, with OR/AND), then the `License ::` classifiers, then the free-form
    `License` field (often the whole licence text, recognised by its standard first sentences).
    """
    expr = (meta.get("License-Expression") or "").strip()
    if expr:
        return _spdx(expr)
    found: set[str] = set()
    bad = False
    for c in meta.get_all("Classifier") or []:
        if not c.startswith("License ::"):
            continue
        low = c.lower()
        name = _permissive_name(low.split("::")[-1])
        if name:
            found.add(name)
        elif low.split("::")[-1].strip() not in NEUTRAL_CLASSIFIERS:
            bad = True
    text = (meta.get("License") or "").strip()
    if text and not found:
        low = text.lower()
        if len(low) < 120:
            if any(w in low for w in COPYLEFT):
                return None
            name = _spdx(text)
            if name:
                found.add(name)
        elif "permission is hereby granted, free of charge" in low:
            found.add("MIT")
        elif "redistribution and use in source and binary forms" in low:
            found.add("BSD")
        elif "apache license" in low and "version 2.0" in low:
            found.add("Apache-2.0")
    if bad or not found:
        return None
    return " OR ".join(sorted(found))


def _permissive_name(s: str) -> str | None:
    s = s.strip().lower()
    if any(w in s for w in COPYLEFT):
        return None
    for key, name in PERMISSIVE.items():
        if re.search(rf"(^|[^a-z]){re.escape(key)}", s):
            return name
    return None


def _spdx(expr: str) -> str | None:
    """Permissive name for an SPDX-like expression: any OR alternative, all AND terms must be permissive."""
    expr = re.sub(r"\s+with\s+[\w.+-]+", "", expr, flags=re.I)  # exceptions only add permissions
    alts = re.split(r"\s+or\s+|\s*/\s*", expr.strip("() "), flags=re.I)
    for alt in alts:
        terms = re.split(r"\s+and\s+", alt.strip("() "), flags=re.I)
        names = [_permissive_name(t.strip("() ")) for t in terms]
        if names and all(names):
            return " AND ".join(dict.fromkeys(n for n in names if n))
    return None


def _usable(parts: tuple[str, ...]) -> bool:
    """Whether a file at this relative path may be trained on (see SKIP_DIRS and HELD_OUT_TESTS)."""
    return not any(p in SKIP_DIRS for p in parts[:-1]) and not any(
        p.removesuffix(".py") in HELD_OUT_TESTS for p in parts
    )


def _read(path: Path) -> str | None:
    try:
        size = path.stat().st_size
        if not MIN_FILE_BYTES <= size <= MAX_FILE_BYTES:
            return None
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    lines = text.splitlines()
    if not lines or max(len(x) for x in lines) > 1000:  # minified or generated tables
        return None
    raw = text.encode("utf-8")
    if len(raw) - len(raw.translate(None, _LETTERS)) < 0.35 * len(raw):  # mostly numbers / data
        return None
    return text.replace("\r\n", "\n")


def collect(max_bytes: int = 300_000_000, max_files: int | None = None, seed: int = 0) -> Corpus:
    """Collect deduplicated training text: all of the stdlib, then a fair share of every permissive package.

    The packages split what the stdlib leaves of `max_bytes` by water-filling: one byte cap for all,
    the largest that fits the budget, so small packages come whole and the biggest (torch,
    transformers) give only their share. `max_files` caps the count (for smoke tests).
    """
    rng = random.Random(seed)
    stdlib = Path(sysconfig.get_paths()["stdlib"]).resolve()
    seen: set[str] = set()
    train: list[SourceFile] = []
    held: list[SourceFile] = []
    total = 0
    stats = {"files_skipped_dup": 0, "files_skipped_held_out_copy": 0}

    held_lines: dict[str, set[str]] = {}
    for name in HELD_OUT:
        p = stdlib / name
        text = _read(p) if p.exists() else None
        if text is not None:
            held.append(SourceFile(p, text, "stdlib"))
            seen.add(hashlib.sha1(text.encode()).hexdigest())
            held_lines[name] = {x.strip() for x in text.splitlines() if len(x.strip()) > 20}

    def add(p: Path, text: str, origin: str) -> bool:
        nonlocal total
        h = hashlib.sha1(text.encode()).hexdigest()
        if h in seen:
            stats["files_skipped_dup"] += 1
            return False
        if p.name in held_lines:  # a vendored/backported copy of a held-out module
            lines = {x.strip() for x in text.splitlines() if len(x.strip()) > 20}
            if lines and len(lines & held_lines[p.name]) > 0.3 * len(lines):
                stats["files_skipped_held_out_copy"] += 1
                return False
        seen.add(h)
        train.append(SourceFile(p, text, origin))
        total += len(text)
        return True

    std_files = sorted(
        p for p in stdlib.rglob("*.py") if _usable(p.relative_to(stdlib).parts) and p.name not in HELD_OUT
    )
    if max_files is not None:
        rng.shuffle(std_files)
    for p in std_files:
        if max_files is not None and len(train) >= max_files // 2:
            break
        text = _read(p)
        if text is not None:
            add(p, text, "stdlib")
    stats["stdlib_files"] = len(train)
    stats["stdlib_bytes"] = total

    candidates = _package_files(rng)
    cap = _fair_cap([sum(size for _, size in files) for _, _, files in candidates], max_bytes - total)
    stats["per_package_cap"] = cap
    packages: list[dict[str, str]] = []
    for d, lic, files in candidates:
        used = n_used = 0
        for p, size in files:
            if used + size > cap or (max_files is not None and len(train) >= max_files):
                continue
            text = _read(p)
            if text is not None and add(p, text, d.metadata["Name"]):
                used += len(text)
                n_used += 1
        if n_used:
            packages.append({"name": d.metadata["Name"], "version": d.version, "license": lic, "files": str(n_used)})
            stats[f"bytes:{d.metadata['Name']}"] = used
    stats["files"] = len(train)
    stats["bytes"] = total
    v = sys.version_info
    return Corpus(train, held, packages, f"{v.major}.{v.minor}.{v.micro}", stats)


def _package_files(rng: random.Random) -> list[tuple[md.Distribution, str, list[tuple[Path, int]]]]:
    """Every permissively licensed distribution with its usable Python files and their sizes (shuffled)."""
    dists = {}
    for d in md.distributions():
        name = (d.metadata.get("Name") or "").strip()
        if name and name.lower() not in dists:
            dists[name.lower()] = d
    out = []
    for key in sorted(dists):
        d = dists[key]
        try:
            lic = classify_license(d.metadata)
            listed = [f for f in d.files or [] if str(f).endswith(".py") and not str(f).startswith("..")]
        except Exception:  # noqa: BLE001 - a broken RECORD/METADATA just means the package is not used
            continue
        if lic is None or key in SKIP_DISTS:
            continue
        files = []
        for f in listed:
            if not _usable(Path(str(f)).parts):
                continue
            p = Path(d.locate_file(f))
            try:
                size = p.stat().st_size
            except OSError:
                continue
            if MIN_FILE_BYTES <= size <= MAX_FILE_BYTES:
                files.append((p, size))
        if files:
            rng.shuffle(files)
            out.append((d, lic, files))
    return out


def _fair_cap(sizes: list[int], budget: int) -> int:
    """The largest per-package cap c with sum(min(size, c)) <= budget (water-filling)."""
    if sum(sizes) <= budget:
        return max(sizes, default=0)
    lo, hi = 0, max(sizes)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if sum(min(s, mid) for s in sizes) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo
