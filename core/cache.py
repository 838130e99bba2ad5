"""Content-addressed cache of arrays (pooled activations, dissector embeddings, layer scores).

Each entry lives in ``<cache_dir>/<kind>/<key>/`` with ``array.npy`` and
``meta.json``.  The key is the SHA-256 of everything that determines the
array (weights hash, model spec, layer, pooling, preprocessing, probe-set
fingerprint, concept list, dissector, cache format version), so a change to
any of them makes a new key and nothing else does.  Entries are written to a
temporary folder and renamed into place, and ``meta.json`` records the
array's SHA-256, so a truncated or corrupt entry is detected and recomputed.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mammo_dissect.core.weights import sha256_file


logger = logging.getLogger(__name__)

#: Bump when the layout or meaning of cached arrays changes.
CACHE_FORMAT_VERSION = 1
ARRAY_FILE = "array.npy"
META_FILE = "meta.json"


def cache_key(parts: dict[str, Any]) -> str:
    """Return the SHA-256 of ``parts`` (sorted JSON) together with the cache format version."""
    payload = json.dumps({"cache_format": CACHE_FORMAT_VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to ``path`` through a temporary file and a rename."""
    write_bytes_atomic(path, json.dumps(data, indent=2, default=str).encode("utf-8"))


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename, removing the temporary file on failure."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        temporary.write_bytes(data)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def sha256_json(value: Any) -> str:
    """Return the SHA-256 of ``value`` as JSON with sorted keys (values JSON cannot hold become strings)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode("utf-8")).hexdigest()


def meta_checksum(meta: dict[str, Any]) -> str:
    """Return the SHA-256 of an entry's metadata without its own ``meta_sha256`` field.

    Metadata carries results too (a layer's null statistics), so it is checked like the array.
    """
    return sha256_json({key: value for key, value in meta.items() if key != "meta_sha256"})


@dataclass
class CacheEntry:
    """One cached array as listed by ``mammo-dissect cache ls``."""

    kind: str
    key: str
    path: Path
    size_bytes: int
    created_at: str
    description: str
    valid: bool


class ArrayCache:
    """Cache of numpy arrays under ``root``, keyed by content.

    With ``recompute`` set, :meth:`load` ignores (and removes) existing entries.
    """

    def __init__(self, root: Path, recompute: bool = False) -> None:
        self.root = Path(root).expanduser()
        self.recompute = recompute

    def entry_dir(self, kind: str, key: str) -> Path:
        return self.root / kind / key

    def load(self, kind: str, key: str, what: str) -> tuple[np.ndarray, dict[str, Any]] | None:
        """Return the cached array and its metadata, or None when absent, corrupt or recomputing.

        The array is memory-mapped read-only.  ``what`` names the array in log messages.
        """
        folder = self.entry_dir(kind, key)
        if not folder.exists():
            logger.info("cache miss for %s: computing it", what)
            return None
        if self.recompute:
            logger.info("recomputing %s (--recompute); removing cache entry %s", what, folder)
            shutil.rmtree(folder, ignore_errors=True)
            return None
        problem = self._check_entry(folder)
        if problem:
            logger.warning("cache entry %s for %s is invalid (%s); recomputing it", folder, what, problem)
            shutil.rmtree(folder, ignore_errors=True)
            return None
        meta = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
        array = np.load(folder / ARRAY_FILE, mmap_mode="r")
        logger.info("reusing cached %s from %s", what, folder)
        return array, meta

    def peek_meta(self, kind: str, key: str) -> dict[str, Any] | None:
        """Return an entry's metadata without checking its array, or None when it is absent or unreadable.

        :meth:`load` still checks the array before it is used.
        """
        try:
            meta = json.loads((self.entry_dir(kind, key) / META_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return meta if isinstance(meta, dict) else None

    def _check_entry(self, folder: Path) -> str:
        meta_path = folder / META_FILE
        array_path = folder / ARRAY_FILE
        if not meta_path.is_file() or not array_path.is_file():
            return "files missing"
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            return f"unreadable metadata: {exc}"
        if meta.get("cache_format") != CACHE_FORMAT_VERSION:
            return f"cache format {meta.get('cache_format')} instead of {CACHE_FORMAT_VERSION}"
        if array_path.stat().st_size != meta.get("size_bytes"):
            return f"size {array_path.stat().st_size} bytes instead of {meta.get('size_bytes')}"
        if meta.get("meta_sha256") != meta_checksum(meta):
            return "metadata checksum mismatch"
        if sha256_file(array_path) != meta.get("sha256"):
            return "checksum mismatch"
        return ""

    def store_file(self, kind: str, key: str, array_file: Path, meta: dict[str, Any]) -> Path:
        """Move a finished ``.npy`` file into the cache as entry ``key``; return the entry's array path."""
        final = self.entry_dir(kind, key)
        final.parent.mkdir(parents=True, exist_ok=True)
        staging = final.parent / f".{key}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        staging.mkdir()
        try:
            os.replace(array_file, staging / ARRAY_FILE)
            record = {
                **meta,
                "cache_format": CACHE_FORMAT_VERSION,
                "size_bytes": (staging / ARRAY_FILE).stat().st_size,
                "sha256": sha256_file(staging / ARRAY_FILE),
                "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            }
            record["meta_sha256"] = meta_checksum(record)
            write_json_atomic(staging / META_FILE, record)
            if final.exists():
                shutil.rmtree(final)
            try:
                os.replace(staging, final)
            except OSError:
                # Another run stored the same key between the two calls.  Keys are content
                # addresses, so its entry contains the same array and is kept.
                if not (final / ARRAY_FILE).is_file():
                    raise
                logger.info("cache entry %s was stored by another run meanwhile; keeping it", final)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
        return final / ARRAY_FILE

    def store(self, kind: str, key: str, array: np.ndarray, meta: dict[str, Any]) -> Path:
        """Write ``array`` into the cache as entry ``key``; return the entry's array path."""
        self.root.mkdir(parents=True, exist_ok=True)
        temporary = self.root / f".{kind}-{key}.{os.getpid()}.{secrets.token_hex(4)}.npy"
        np.save(temporary, np.ascontiguousarray(array))
        return self.store_file(kind, key, temporary, meta)

    def entries(self) -> list[CacheEntry]:
        """List every entry, checking each one's checksum."""
        found = []
        if not self.root.exists():
            return found
        for kind_dir in sorted(path for path in self.root.iterdir() if path.is_dir() and not path.name.startswith(".")):
            for folder in sorted(path for path in kind_dir.iterdir() if path.is_dir() and not path.name.startswith(".")):
                problem = self._check_entry(folder)
                meta: dict[str, Any] = {}
                if (folder / META_FILE).is_file():
                    try:
                        meta = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
                    except (OSError, json.JSONDecodeError):
                        meta = {}
                size = sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())
                found.append(
                    CacheEntry(
                        kind=kind_dir.name,
                        key=folder.name,
                        path=folder,
                        size_bytes=size,
                        created_at=str(meta.get("created_at", "")),
                        description=str(meta.get("description", "")),
                        valid=not problem,
                    )
                )
        return found

    def remove(self, kind: str | None = None, key_prefix: str = "", invalid_only: bool = False) -> list[CacheEntry]:
        """Remove entries matching ``kind`` and ``key_prefix`` (all by default); return them.

        Removing everything (no filter) also deletes the remembered file hashes
        (:mod:`mammo_dissect.core.file_hashes`), so the next run hashes its input files again.
        """
        if kind is None and not key_prefix and not invalid_only:
            from mammo_dissect.core.file_hashes import remove_file_hashes

            remove_file_hashes(self.root)
        removed = []
        for entry in self.entries():
            if kind is not None and entry.kind != kind:
                continue
            if not entry.key.startswith(key_prefix):
                continue
            if invalid_only and entry.valid:
                continue
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(entry)
        return removed
