"""Where ecif keeps caches shared between runs (trained demo models, backbone features), and where
it finds the data files it ships (:func:`asset_path`)."""

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


_PACKAGE_DIR = Path(__file__).resolve().parent


def assets_dir() -> Path:
    """The folder of shipped data files: the repository's ``assets/`` in a checkout (also under an
    editable install), ``ecif/_assets`` inside an installed wheel (setup.py maps one onto the other;
    only ``models/*.safetensors`` and ``models/*.json`` are shipped)."""
    shipped = _PACKAGE_DIR / "_assets"
    checkout = _PACKAGE_DIR.parent / "assets"
    if not shipped.is_dir() and (_PACKAGE_DIR.parent / "pyproject.toml").is_file():
        return checkout
    return shipped


def asset_path(name: str | os.PathLike[str]) -> Path:
    """The path of ``assets/<name>`` (e.g. ``asset_path("models/ecif-demo.safetensors")``) in the
    checkout or the installed wheel, whichever ecif runs from.  The file need not exist: check with
    ``.exists()`` where it is optional."""
    return assets_dir() / name
