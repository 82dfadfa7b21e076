"""Settings: defaults, TOML, environment and flags, in that order of precedence."""

from __future__ import annotations

from pathlib import Path

import pytest

from node.config import DEFAULT_MODEL, DEFAULT_PORT, load_settings
from node.errors import InvalidRequest
from node.serving.experts import ChatMessage, completion_prompt, expert_id_for


def test_defaults() -> None:
    settings = load_settings(environ={})
    assert settings.port == DEFAULT_PORT
    assert settings.host == "127.0.0.1"
    assert settings.models == (DEFAULT_MODEL,)
    assert settings.n_gpu_layers == -1


def test_toml_then_env_then_flags(tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text('[node]\nport = 9000\nhost = "0.0.0.0"\nmodels = ["gemma3-270m"]\nqueue_size = 3\n')
    settings = load_settings(config, environ={"EXPERTMESH_PORT": "9100"})
    assert (settings.port, settings.host, settings.models, settings.queue_size) == (9100, "0.0.0.0", ("gemma3-270m",), 3)
    settings = load_settings(config, {"port": 9200, "models": ("a.gguf",)}, environ={"EXPERTMESH_PORT": "9100"})
    assert (settings.port, settings.models) == (9200, ("a.gguf",))


def test_bad_config_files_are_named(tmp_path: Path) -> None:
    broken = tmp_path / "broken.toml"
    broken.write_text("port = [")
    with pytest.raises(InvalidRequest, match="not valid TOML"):
        load_settings(broken, environ={})
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("colour = 'blue'\n")
    with pytest.raises(InvalidRequest, match="colour"):
        load_settings(unknown, environ={})
    with pytest.raises(InvalidRequest, match="not found"):
        load_settings(tmp_path / "missing.toml", environ={})
    with pytest.raises(InvalidRequest, match="port"):
        load_settings(environ={"EXPERTMESH_PORT": "eighty"})
    with pytest.raises(InvalidRequest, match="port"):
        load_settings(overrides={"port": 70000}, environ={})


def test_expert_ids_are_name_and_sha_prefix() -> None:
    assert expert_id_for("smollm2-135m", "b179c9523d0e6a0f98a3") == "smollm2-135m@b179c9523d0e"


def test_completion_prompt_is_a_plain_transcript() -> None:
    messages = [
        ChatMessage("system", "Be brief."),
        ChatMessage("user", "What is 2+2?"),
        ChatMessage("assistant", "4"),
        ChatMessage("user", "And 3+3?"),
    ]
    assert completion_prompt(messages) == "Be brief.\n\nQ: What is 2+2?\nA: 4\nQ: And 3+3?\nA:"
