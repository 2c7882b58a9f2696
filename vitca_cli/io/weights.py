"""The weights registry: shipped models, a user cache, and ``--weights NAME|PATH`` resolution.

- Shipped weights live in the package's ``weights/`` folder with ``manifest.json`` (name, file, dataset, channels,
  training image size, iterations, validation PSNR/SSIM, sha256, how it was trained, optional download url).
- The cache folder (``platformdirs`` user cache, or ``$VITCA_HOME``) holds downloaded and user-added weights in
  ``<home>/weights/``: drop ``NAME.pt`` (or ``NAME.onnx``) there and ``--weights NAME`` finds it.
- A name listed in the manifest is always checked against its sha256; a mismatch or unreadable file is a
  ``WeightsError`` (exit 3) that says what to do.

No torch here: listing and resolving weights is cheap.
"""

from __future__ import annotations

import hashlib
import json
import os
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from vitca_cli.errors import WeightsError
from vitca_cli.io.files import atomic_write_bytes, sha256_file  # noqa: F401 - sha256_file is used by importers
from vitca_cli.log import log

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "vitca-weights-manifest"
SUFFIXES = (".pt", ".onnx")
# The shipped model used when --weights is not given, by the image's channel count.
DEFAULT_FOR_CHANNELS = {1: "fashion-mnist", 3: "photo"}
# Where a command's default differs from DEFAULT_FOR_CHANNELS': command -> channel count -> shipped model.
DEFAULT_FOR_COMMAND = {"inpaint": {3: "photo-inpaint"}}
COMMANDS = ("denoise", "inpaint", "export-onnx")
# A shipped model that restores large images of a default model's kind in fewer cell-steps (fused), at a cost in
# fine detail: suggested when the default meets a large image.
FASTER_FOR_LARGE = {"photo": "photo-fused"}
# In a source checkout the folder is ./weights; an installed wheel has it as the vitca_cli.shipped_weights package.
SHIPPED_DIRS = (
    Path(__file__).resolve().parents[1] / "shipped_weights",
    Path(__file__).resolve().parents[2] / "weights",
)


def shipped_dir() -> Path:
    """The folder that holds the shipped weights and their manifest."""
    for d in SHIPPED_DIRS:
        if (d / MANIFEST).is_file():
            return d
    return SHIPPED_DIRS[-1]


def home_dir() -> Path:
    """vitca's cache folder: ``$VITCA_HOME`` if set, else the platform's user cache folder."""
    env = os.environ.get("VITCA_HOME")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("vitca"))


def cache_dir() -> Path:
    """Where downloaded and user-added weights live (``<home>/weights``)."""
    return home_dir() / "weights"


# ---------------------------------------------------------------------------------------------------------------------
# The manifest
# ---------------------------------------------------------------------------------------------------------------------
def read_manifest(directory: Path | None = None) -> list[dict]:
    """The model entries of ``directory``'s manifest (the shipped one by default); none if there is no manifest."""
    path = (directory or shipped_dir()) / MANIFEST
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text())
        models = data["models"]
        assert isinstance(models, list) and all(isinstance(m, dict) and "name" in m for m in models)
    except (OSError, ValueError, KeyError, AssertionError):
        raise WeightsError(f"{path}: unreadable weights manifest; reinstall vitca or restore the file") from None
    return models


def write_manifest_entry(entry: dict, directory: Path) -> None:
    """Add or replace (by name) one model entry in ``directory``'s manifest, written atomically."""
    path = Path(directory) / MANIFEST
    models = [m for m in (read_manifest(directory) if path.is_file() else []) if m["name"] != entry["name"]]
    models.append(entry)
    models.sort(key=lambda m: m["name"])
    text = json.dumps({"format": MANIFEST_FORMAT, "version": 1, "models": models}, indent=2) + "\n"
    atomic_write_bytes(path, lambda f: f.write(text.encode()))


def manifest_entry(name: str) -> dict | None:
    return next((m for m in read_manifest() if m["name"] == name), None)


# ---------------------------------------------------------------------------------------------------------------------
# Resolution
# ---------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class WeightsRef:
    """Resolved weights: a ``name`` for logs, the file ``path``, where it came from (shipped, cache, path) and
    its manifest ``entry`` (if listed)."""

    name: str
    path: Path
    source: str
    entry: dict | None = None


def looks_like_path(spec: str) -> bool:
    return os.sep in spec or "/" in spec or spec.endswith(SUFFIXES + (".pth",)) or Path(spec).is_file()


def default_name(channels: int, command: str = "denoise") -> str:
    """The shipped model that ``command`` runs on images with ``channels`` channels."""
    kind = 1 if channels == 1 else 3
    return DEFAULT_FOR_COMMAND.get(command, {}).get(kind, DEFAULT_FOR_CHANNELS[kind])


def resolve(spec: str | None, channels: int | None = None, suffix: str = ".pt", command: str = "denoise") -> WeightsRef:
    """Resolve ``--weights NAME|PATH`` (or, when ``spec`` is None, ``command``'s default for ``channels``) to a
    checked file.

    A PATH is used as is. A NAME is looked up in the shipped manifest (file in ``weights/``, else in the cache,
    verified against its sha256), then as ``NAME<suffix>`` in the cache folder. ``suffix`` picks the file kind
    (``.onnx`` for the ONNX backend). Missing, unknown or corrupt weights raise ``WeightsError`` (exit 3).
    """
    if spec is None:
        if channels is None:
            raise ValueError("resolve() needs a spec or a channel count")
        name = default_name(channels, command)
        try:
            ref = resolve(name, suffix=suffix)
        except WeightsError as exc:
            raise WeightsError(
                f"no default weights for {channels}-channel images ({exc}); pass --weights NAME|PATH "
                f"(a checkpoint from `vitca train` works), or see `vitca weights list`"
            ) from None
        return ref
    spec = str(spec)
    if looks_like_path(spec):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise WeightsError(f"{spec}: weights file not found")
        return WeightsRef(path.stem, path, "path")
    entry = manifest_entry(spec)
    if entry is not None and suffix == ".pt":
        return WeightsRef(spec, _entry_file(entry), "shipped", entry)
    for candidate in [cache_dir() / f"{spec}{suffix}"] + [cache_dir() / f"{spec}{s}" for s in SUFFIXES]:
        if candidate.is_file():
            return WeightsRef(spec, candidate, "cache", entry)
    if entry is not None:  # listed, but not in the requested kind
        return WeightsRef(spec, _entry_file(entry), "shipped", entry)
    known = sorted({m["name"] for m in read_manifest()} | set(_cached_names()))
    raise WeightsError(
        f"unknown weights {spec!r}; available: {', '.join(known) or 'none'} (see `vitca weights list`), "
        f"or give a file path"
    )


def _entry_file(entry: dict) -> Path:
    """The verified file of a manifest entry: shipped, or previously downloaded into the cache, or downloaded now."""
    name, filename = entry["name"], entry.get("file", f"{entry['name']}.pt")
    for path in (shipped_dir() / filename, cache_dir() / filename):
        if path.is_file():
            verify(path, entry)
            return path
    if entry.get("url"):
        return fetch(entry)
    raise WeightsError(
        f"weights {name!r} are listed but {filename} is missing from {shipped_dir()} and {cache_dir()}; "
        f"reinstall vitca or put the file in {cache_dir()}"
    )


def verify(path: Path, entry: dict) -> None:
    """Check ``path`` against the manifest's sha256 (entries without one are trusted)."""
    expected = entry.get("sha256")
    if not expected:
        return
    actual = sha256_file(path)
    if actual != expected:
        raise WeightsError(
            f"{path}: checksum mismatch for weights {entry['name']!r} (expected sha256 {expected[:12]}…, "
            f"got {actual[:12]}…); the file is corrupt or was replaced: delete it and reinstall or re-download"
        )


def fetch(entry: dict) -> Path:
    """Download ``entry['url']`` into the cache, check its sha256, and rename into place (no half files)."""
    dest = cache_dir() / entry.get("file", f"{entry['name']}.pt")
    url = entry["url"]
    log.info(f"downloading weights {entry['name']!r} from {url}")
    digest = hashlib.sha256()

    def write(f):
        with urllib.request.urlopen(url, timeout=60) as response:
            for chunk in iter(lambda: response.read(1 << 20), b""):
                digest.update(chunk)
                f.write(chunk)
        if entry.get("sha256") and digest.hexdigest() != entry["sha256"]:
            raise WeightsError(
                f"{url}: downloaded weights fail their checksum (expected sha256 {entry['sha256'][:12]}…, got "
                f"{digest.hexdigest()[:12]}…); nothing was saved, try again later"
            )

    try:
        atomic_write_bytes(dest, write)
    except OSError as exc:
        raise WeightsError(
            f"cannot download weights {entry['name']!r} from {url} ({exc}); download it by hand into {cache_dir()}"
        ) from None
    return dest


def _cached_names() -> list[str]:
    d = cache_dir()
    return sorted({p.stem for p in d.glob("*") if p.suffix in SUFFIXES}) if d.is_dir() else []


def list_weights() -> list[dict]:
    """Every known model: shipped manifest entries (with ``status`` ok/missing/corrupt) and user-added cache files."""
    rows = []
    for entry in read_manifest():
        filename = entry.get("file", f"{entry['name']}.pt")
        path = next((p for p in (shipped_dir() / filename, cache_dir() / filename) if p.is_file()), None)
        status = "missing" if path is None else "ok"
        if path is not None and entry.get("sha256") and sha256_file(path) != entry["sha256"]:
            status = "corrupt"
        if path is None and entry.get("url"):
            status = "downloadable"
        rows.append({**entry, "source": "shipped", "status": status, "path": str(path) if path else ""})
    listed = {r["name"] for r in rows}
    for name in _cached_names():
        if name not in listed:
            path = next(cache_dir() / f"{name}{s}" for s in SUFFIXES if (cache_dir() / f"{name}{s}").is_file())
            rows.append({"name": name, "source": "cache", "status": "ok", "path": str(path)})
    return rows
