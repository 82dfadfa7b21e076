"""Settings: defaults, TOML, environment and flags, in that order of precedence."""

from __future__ import annotations

from pathlib import Path

import pytest

from node.cli import _parser
from node.config import (
    DEFAULT_MODEL,
    DEFAULT_PORT,
    Settings,
    load_settings,
    overrides_from,
)
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


def test_environment_values_take_each_settings_shape() -> None:
    settings = load_settings(
        environ={
            "EXPERTMESH_MIN_SCORES": '{"knowledge": 0.5, "code": 1}',
            "EXPERTMESH_PEERS": "http://a:1, http://b:2,",
            "EXPERTMESH_MDNS": "no",
            "EXPERTMESH_SAFE_CPU_KERNELS": "true",
            "EXPERTMESH_N_THREADS": "2",
            "EXPERTMESH_SPOT_CHECK_INTERVAL_S": "0",
            "EXPERTMESH_API_KEY": "",  # empty: not set
        }
    )
    assert settings.min_scores == {"knowledge": 0.5, "code": 1.0}
    assert settings.peers == ("http://a:1", "http://b:2")
    assert (settings.mdns, settings.safe_cpu_kernels, settings.n_threads) == (False, True, 2)
    assert (settings.spot_check_interval_s, settings.api_key) == (0.0, None)
    assert load_settings(environ={"EXPERTMESH_MIN_SCORES": "knowledge=0.5, code=0.7"}).min_scores == {
        "knowledge": 0.5,
        "code": 0.7,
    }
    assert load_settings(environ={"EXPERTMESH_SAFE_CPU_KERNELS": "auto"}).safe_cpu_kernels == "auto"


@pytest.mark.parametrize(
    "environ, setting",
    [
        ({"EXPERTMESH_MIN_SCORES": '{"knowledge": 1.5}'}, "min_scores"),
        ({"EXPERTMESH_MIN_SCORES": "{not json"}, "min_scores"),
        ({"EXPERTMESH_MIN_SCORES": "knowledge"}, "min_scores"),
        ({"EXPERTMESH_EXPLORATION": "greedy"}, "exploration"),
        ({"EXPERTMESH_PEER_DEAD_AFTER_S": "0"}, "peer_dead_after_s"),
        ({"EXPERTMESH_MDNS": "maybe"}, "mdns"),
        ({"EXPERTMESH_PARALLEL": "65"}, "parallel"),
        ({"EXPERTMESH_UNVERIFIED_SHARE_MAX": "1.5"}, "unverified_share_max"),
        ({"EXPERTMESH_SAFE_CPU_KERNELS": "sometimes"}, "safe_cpu_kernels"),
    ],
)
def test_bad_environment_values_name_the_setting_and_variable(environ: dict[str, str], setting: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        load_settings(environ=environ)
    assert info.value.param == setting
    assert f"setting {setting!r} (from EXPERTMESH_{setting.upper()})" in info.value.message


def test_toml_values_are_checked_by_type(tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text("[node]\nmin_scores = { knowledge = true }\n")
    with pytest.raises(InvalidRequest, match="min_scores"):
        load_settings(config, environ={})
    config.write_text('[node]\nmodels = []\n')
    with pytest.raises(InvalidRequest, match=f"'models' \\(in {config}\\)"):
        load_settings(config, environ={})
    config.write_text('[node]\ndata_dir = "~/em"\n[node.min_scores]\ncode = 0.25\n')
    settings = load_settings(config, environ={})
    assert settings.data_dir == Path.home() / "em" and settings.min_scores == {"code": 0.25}


def test_start_flags_reach_settings_by_name() -> None:
    args = _parser().parse_args(
        ["start", "--port", "9001", "--model", "a.gguf", "--model", "b.gguf", "--no-mdns", "--threads", "2",
         "--safe-cpu-kernels", "false", "--offer-relay", "--join", "inv1"]
    )
    settings = load_settings(args.config, overrides_from(args), environ={"EXPERTMESH_PORT": "9100"})
    assert (settings.port, settings.models, settings.mdns, settings.n_threads) == (9001, ("a.gguf", "b.gguf"), False, 2)
    assert (settings.safe_cpu_kernels, settings.relay, settings.join) == (False, True, ("inv1",))
    with pytest.raises(InvalidRequest, match="from the command line"):
        load_settings(overrides=overrides_from(_parser().parse_args(["start", "--n-ctx", "0"])), environ={})


def test_settings_built_in_code_are_validated_too() -> None:
    # A list on purpose: pydantic validates fields of a Settings built in code, and makes it a tuple.
    assert Settings(relays=["http://r:1"]).relays == ("http://r:1",)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Settings(port=-1)


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
