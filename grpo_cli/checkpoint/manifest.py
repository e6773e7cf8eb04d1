"""A checkpoint's records of itself, and what makes one complete: `manifest.json` and `SHA256SUMS`.

The save writes them last (the manifest the very last file): `SHA256SUMS` holds the SHA-256 of every other
file, in the format of coreutils' `sha256sum` (so `sha256sum -c SHA256SUMS` checks a copy by hand), and
`manifest.json` the size of every file, `SHA256SUMS` included. Keeping the digests out of manifest.json keeps
its format, `{file: size}`: an older grpo still reads these checkpoints (a manifest it could not read would make
it take every checkpoint for a torn one, and --resume start the run over).

A checkpoint is complete when its manifest lists files that are all there at their sizes. That check
(`is_complete`) reads no file but the manifest, so it is the one used to list checkpoints: `latest`,
`complete_checkpoints`, and pruning at every save, which would otherwise hash every kept checkpoint at every
save. Checking the contents against the checksums before loading is verification.py's.

Why SHA-256: on the machines measured it is the fastest sound hash (only the broken sha1 is faster, and crc32
has no cryptographic strength), and `sha256sum` is on every system; the figures are in docs/performance.md.
Files are hashed in parallel threads (hashlib releases the GIL), which helps a checkpoint of several large
files when cores are free.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from grpo_cli.checkpoint.layout import CHECKSUMS, MANIFEST, STATE_FILE, leads_outside, step_of
from grpo_cli.errors import UserError

_CHUNK = 1 << 20  # bytes read per hash update


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    buffer = bytearray(_CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as handle:
        while size := handle.readinto(buffer):
            digest.update(view[:size])
    return digest.hexdigest()


def sha256s(directory: Path, names: list[str]) -> dict[str, str]:
    """{name: hex SHA-256}, the files hashed in parallel (hashlib releases the GIL)."""
    if not names:
        return {}
    with ThreadPoolExecutor(min(len(names), os.cpu_count() or 1, 8)) as pool:
        return dict(zip(names, pool.map(lambda name: _sha256(directory / name), names)))


def write_manifest(directory: Path) -> None:
    """Write SHA256SUMS, then manifest.json, for every file now in `directory`.

    Not flushed to the disk here: the save writes a checkpoint with atomic.write_directory, which flushes the
    whole directory before renaming it into place, so a checkpoint that appears has every file on the disk."""
    names = [str(f.relative_to(directory)) for f in sorted(directory.rglob("*")) if f.is_file()]
    digests = sha256s(directory, names)
    (directory / CHECKSUMS).write_text("".join(f"{digests[name]}  {name}\n" for name in names))
    files = {name: (directory / name).stat().st_size for name in [*names, CHECKSUMS]}
    (directory / MANIFEST).write_text(json.dumps(files, indent=1))


def read_checksums(path: Path) -> dict[str, str]:
    """SHA256SUMS as {file: hex digest}; a line it cannot parse is an error."""
    sums = {}
    for line in (path / CHECKSUMS).read_text().splitlines():
        digest, sep, name = line.partition(" ")
        name = name[1:] if name[:1] in " *" else ""  # `sha256sum` writes "<hex>  <name>" ("<hex> *<name>" binary)
        if not sep or not name or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise ValueError(f"unreadable line {line[:80]!r}")
        sums[name] = digest
    return sums


def read_manifest(path: Path) -> dict[str, int] | None:
    """The manifest's {file: size} when every file is there at its size; else None."""
    try:
        files = json.loads((path / MANIFEST).read_text())
        if isinstance(files, dict) and STATE_FILE in files and \
                all((path / n).stat().st_size == size for n, size in files.items()):
            return files
    except (OSError, ValueError, TypeError):
        pass
    return None


def why_incomplete(path: Path) -> str:
    """What is missing from an incomplete checkpoint, for messages."""
    try:
        files = json.loads((path / MANIFEST).read_text())
    except OSError:
        return f"no {MANIFEST}"
    except ValueError:
        return f"{MANIFEST} cannot be read"
    if not isinstance(files, dict) or STATE_FILE not in files:
        return f"{MANIFEST} does not list {STATE_FILE}"
    wrong = []
    for name, size in files.items():
        try:
            actual = (path / name).stat().st_size
        except OSError:
            wrong.append(f"{name} is missing")
            continue
        if actual != size:
            wrong.append(f"{name} has {actual} bytes, not the {size} of its manifest")
    return "; ".join(wrong[:5]) or "its manifest does not match its files"


def is_complete(path: Path) -> bool:
    """Whether `path` is a checkpoint whose manifest lists files that are all there, at their sizes.

    Reads no file but the manifest: the cheap check for listing checkpoints. `verification.verify` checks
    contents."""
    return read_manifest(path) is not None


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Every complete checkpoint of the run (sizes checked, contents not), oldest first. A link among them to a
    checkpoint elsewhere is a UserError: resuming, evaluating or pruning it would use another run's files."""
    found = []
    for path in (run_dir / "checkpoints").glob("step-*"):
        step = step_of(path)
        if step is not None and is_complete(path):
            outside = leads_outside(path.parent, path.name)
            if outside:
                raise UserError(f"{path} {outside}: a run's checkpoints are its own directories, not links to "
                                "others'. Move that checkpoint into the run, or remove the link.")
            found.append((step, path))
    return [path for _, path in sorted(found)]
