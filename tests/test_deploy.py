"""The Docker files agree with the code: docker-compose.yml is valid, every command they run
is one the `postback` command takes, and every variable they set is a setting it reads.

No Docker engine runs here: the compose file is checked by docker-compose itself (`config
-q`, which reads and validates without one), the rest by reading the files.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from ops.cli import _parser
from worker.config import Settings

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
ENV_EXAMPLE = ROOT / ".env.example"
RELAY_IMAGE = "postback-relay:latest"

SETTINGS = {f"POSTBACK_{name.upper()}" for name in Settings.model_fields}
COMPOSE_ONLY = {"POSTGRES_PASSWORD", "API_PUBLISH"}
"""Variables of .env.example that fill in docker-compose.yml rather than set the relay."""


def _compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return loaded


def _relay_services() -> dict[str, dict[str, Any]]:
    return {
        name: service
        for name, service in _compose()["services"].items()
        if service.get("image") == RELAY_IMAGE
    }


def _dockerfile(instruction: str) -> list[str]:
    """The last exec-form (JSON) value of a Dockerfile instruction, as Docker reads it."""
    found = re.findall(rf"^{instruction} (\[.*\])$", DOCKERFILE.read_text(), re.MULTILINE)
    assert found, f"no exec-form {instruction} in the Dockerfile"
    value: list[str] = json.loads(found[-1])
    return value


def _parses(args: list[str]) -> None:
    try:
        _parser().parse_args(args)
    except SystemExit as exc:  # argparse's way of refusing
        pytest.fail(f"`postback {' '.join(args)}` is not a command postback takes ({exc})")


def _compose_binary() -> list[str]:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if (
        shutil.which("docker")
        and subprocess.run(
            ["docker", "compose", "version"], capture_output=True, check=False
        ).returncode
        == 0
    ):
        return ["docker", "compose"]
    pytest.fail("docker-compose is not installed: `apt-get install docker-compose` (.ci/run does)")


@pytest.mark.parametrize("profile", [None, "demo"])
def test_the_compose_file_is_valid(tmp_path: Path, profile: str | None) -> None:
    # In a copy, with .env made from .env.example as a user would: the file names it.
    for name in ("docker-compose.yml", "Dockerfile", ".dockerignore"):
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copy(ENV_EXAMPLE, tmp_path / ".env")
    profiles = [] if profile is None else ["--profile", profile]
    result = subprocess.run(
        [*_compose_binary(), *profiles, "config", "-q"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_the_image_runs_the_postback_command_and_compose_runs_real_subcommands() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert _dockerfile("ENTRYPOINT") == ["postback"]
    assert scripts["postback"] == "ops.cli:main"
    _parses(_dockerfile("CMD"))
    services = _relay_services()
    expected = {"migrate", "worker", "api", "demo-migrate", "demo-receiver", "demo-worker", "demo"}
    assert expected <= set(services)
    for service in services.values():
        _parses(service["command"])
    assert services["migrate"]["command"] == ["db", "init"]
    assert services["worker"]["command"] == ["worker"]
    assert services["api"]["command"][0] == "serve"


def test_every_variable_set_is_a_setting_and_env_example_lists_every_setting() -> None:
    compose = _compose()
    for name, service in compose["services"].items():
        if service.get("image") != RELAY_IMAGE:
            continue
        unknown = {k for k in service.get("environment", {}) if k not in SETTINGS}
        assert not unknown, f"{name} sets {unknown}, which the relay does not read"
    dockerfile_env = set(re.findall(r"\b(POSTBACK_[A-Z_]+)=", DOCKERFILE.read_text()))
    assert dockerfile_env <= SETTINGS

    listed = re.findall(r"^#? ?([A-Z][A-Z0-9_]*)=", ENV_EXAMPLE.read_text(), re.MULTILINE)
    assert len(listed) == len(set(listed)), "a variable is listed twice"
    assert set(listed) == SETTINGS | COMPOSE_ONLY
    used = set(re.findall(r"\$\{([A-Z_]+)", COMPOSE.read_text()))
    assert used <= COMPOSE_ONLY


def test_the_api_port_and_the_demo_network_line_up() -> None:
    compose = _compose()
    api = compose["services"]["api"]
    port = api["command"][api["command"].index("--port") + 1]
    assert any(mapping.endswith(f":{port}") for mapping in api["ports"])
    assert f"127.0.0.1:{port}/healthz" in " ".join(api["healthcheck"]["test"])
    # The demo worker may reach the demo network, and only it.
    subnet = compose["networks"]["demo"]["ipam"]["config"][0]["subnet"]
    for name, service in _relay_services().items():
        allowed = service.get("environment", {}).get("POSTBACK_ALLOW_NETWORKS")
        assert allowed == (subnet if name == "demo-worker" else None), name
    # The demo's services share their servers with each other and with nothing else.
    services = compose["services"]
    production = services["worker"]["environment"]
    for name in ("demo-migrate", "demo-worker", "demo"):
        env = services[name]["environment"]
        for url in ("POSTBACK_DATABASE_URL", "POSTBACK_REDIS_URL"):
            assert env[url] == services["demo"]["environment"][url], (name, url)
            assert env[url] != production[url], (name, url)
    # A stopping worker gets longer than it waits for its in-flight deliveries.
    grace = int(compose["services"]["worker"]["stop_grace_period"].rstrip("s"))
    assert grace > Settings.model_fields["shutdown_wait"].default
