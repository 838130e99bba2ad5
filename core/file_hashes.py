"""Remembered SHA-256 hashes of input files (probe images, weights files).

Hashing every probe image on every run costs more than the rest of a warm
run.  This module keeps each file's SHA-256 in a small JSON record under
``<cache_dir>/file_hashes/`` together with the file's identity: absolute
path, size, modification and change times in nanoseconds, inode and device.
A remembered hash is used only when all of them still match, so a file that
was rewritten, replaced, touched or resized is hashed again.  A file that
changes while it is hashed is not remembered.

Records are grouped (one JSON file per probe set, one for weights files)
so a run reads only the records it can use.  They are written through a
temporary file and a rename.  Two processes that write the same group at
once can lose some of each other's records, and those files are then
hashed again by the next run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from mammo_dissect.core.cache import write_bytes_atomic
from mammo_dissect.core.weights import sha256_file


logger = logging.getLogger(__name__)

#: Folder of the records, under the cache folder.
FILE_HASHES_DIR = "file_hashes"
#: Format of the records.  Bump it when their layout changes, so older records are ignored.
FILE_HASHES_FORMAT = 1


def _identity(stat: os.stat_result) -> list[int]:
    return [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino, stat.st_dev]


class FileHashes:
    """SHA-256 hashes of files, remembered by file identity in ``<cache_root>/file_hashes/<group>.json``.

    With ``cache_root`` None nothing is remembered.  With ``recompute`` set,
    every file is hashed again and the new hashes are remembered.
    """

    def __init__(self, cache_root: Path | None, group: str, recompute: bool = False) -> None:
        self.path = None
        if cache_root is not None:
            name = hashlib.sha256(group.encode("utf-8")).hexdigest()[:32]
            self.path = Path(cache_root).expanduser() / FILE_HASHES_DIR / f"{name}.json"
        self.group = group
        self.recompute = recompute
        self._records: dict[str, list[Any]] = {}
        self._new: dict[str, list[Any]] = {}
        if self.path is not None and not recompute:
            self._records = self._read()
        #: How many hashes came from the records and how many were computed (for logs and tests).
        self.reused = 0
        self.computed = 0

    def _read(self) -> dict[str, list[Any]]:
        assert self.path is not None
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            logger.warning("ignoring unreadable file-hash records %s (%s); hashing the files again", self.path, exc)
            return {}
        if not isinstance(data, dict) or data.get("format") != FILE_HASHES_FORMAT or not isinstance(data.get("files"), dict):
            return {}
        return data["files"]

    def sha256(self, path: str | Path) -> str:
        """Return the SHA-256 of the file at ``path``, reusing a remembered hash when its identity matches."""
        key = os.path.abspath(path)
        before = os.stat(key)
        identity = _identity(before)
        record = self._records.get(key)
        if record is not None and len(record) == len(identity) + 1 and record[:-1] == identity:
            self.reused += 1
            return str(record[-1])
        digest = sha256_file(Path(key))
        self.computed += 1
        if _identity(os.stat(key)) == identity:
            self._new[key] = [*identity, digest]
        return digest

    def save(self) -> None:
        """Write the hashes computed since the records were read; a failure is logged, not raised."""
        if self.path is None or not self._new:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            records = self._read()
            records.update(self._new)
            payload = {"format": FILE_HASHES_FORMAT, "group": self.group, "files": records}
            write_bytes_atomic(self.path, json.dumps(payload, separators=(",", ":")).encode("utf-8"))
        except OSError as exc:
            logger.warning(
                "could not write the file-hash records %s (%s); the next run hashes these files again",
                self.path, exc,
            )
            return
        self._records.update(self._new)
        self._new = {}


def remove_file_hashes(cache_root: Path) -> int:
    """Remove every remembered file hash under ``cache_root``; return how many record files were removed."""
    folder = Path(cache_root).expanduser() / FILE_HASHES_DIR
    if not folder.is_dir():
        return 0
    count = sum(1 for path in folder.iterdir() if path.suffix == ".json")
    shutil.rmtree(folder, ignore_errors=True)
    return count
