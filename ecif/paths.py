"""Where ecif keeps caches shared between runs (trained demo models, backbone features)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def cache_dir() -> Path:
    """The cache root: ``$ECIF_CACHE`` if set, else ``~/.cache/ecif``. Created on first use."""
    root = Path(os.environ.get("ECIF_CACHE") or Path.home() / ".cache" / "ecif")
    root.mkdir(parents=True, exist_ok=True)
    return root


def file_sha256(path: str | os.PathLike[str], chunk_bytes: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes (used to key caches and to record provenance)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def text_sha256(*parts: str) -> str:
    """Hex SHA-256 of strings joined by a separator that cannot occur in them."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode("utf-8"))
        digest.update(b"\x1f")
    return digest.hexdigest()
