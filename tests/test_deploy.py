"""The Docker files agree with the code: docker-compose.yml is valid, every command they run
is one the `postback` command takes, and every variable they set is a setting it reads.

No Docker engine runs here: the compose file is checked by docker-compose itself (`config
-q`, which reads and validates without one), the rest by reading the files.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from ops.cli.commands import _parser
from tests import leakcheck
from tests.support.cli import POSTBACK, clean_env
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
    pytest.fail(
        "docker-compose is not installed: `apt-get install docker-compose` "
        "(`make test` does, as root)"
    )


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


@pytest.mark.unit
def test_the_image_runs_the_postback_command_and_compose_runs_real_subcommands() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert _dockerfile("ENTRYPOINT") == ["postback"]
    assert scripts["postback"] == "ops.cli.commands:main"
    _parses(_dockerfile("CMD"))
    services = _relay_services()
    expected = {"migrate", "worker", "api", "demo-migrate", "demo-receiver", "demo-worker", "demo"}
    assert expected <= set(services)
    for service in services.values():
        _parses(service["command"])
    assert services["migrate"]["command"] == ["db", "init"]
    assert services["worker"]["command"] == ["worker"]
    assert services["api"]["command"][0] == "serve"


@pytest.mark.unit
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


@pytest.mark.unit
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


def _env_example(commented: bool = True) -> dict[str, str]:
    """Each variable .env.example sets, with the value written after `=`; with `commented`,
    also those on a commented line (`# POSTBACK_X=default`)."""
    pattern = r"^#? ?([A-Z][A-Z0-9_]*)=(.*)$" if commented else r"^([A-Z][A-Z0-9_]*)=(.*)$"
    return dict(re.findall(pattern, ENV_EXAMPLE.read_text(), re.MULTILINE))


@pytest.mark.unit
def test_env_example_shows_the_default_of_every_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each line of .env.example, read as the relay reads that variable, gives the setting's
    default: uncommenting any of them changes nothing. An empty value stands for unset."""
    listed = {name: value for name, value in _env_example().items() if name in SETTINGS}
    assert set(listed) == SETTINGS
    for name in list(os.environ):
        if name.startswith("POSTBACK_"):
            monkeypatch.delenv(name)
    for name, value in listed.items():
        if value:
            monkeypatch.setenv(name, value)
    read = Settings()
    for name, value in listed.items():
        field = name.removeprefix("POSTBACK_").lower()
        default = Settings.model_fields[field].default
        if value == "":
            assert default is None, f"{name}= says unset, but the default is {default!r}"
        else:
            assert default is not None, f"{name}={value}, but the setting is unset by default"
            assert getattr(read, field) == default, (
                f"{name}={value}, but the default is {default!r}"
            )


def _filled_in(value: str, env: dict[str, str]) -> str:
    """A compose value with each `${NAME:-default}` filled in from .env, as compose does."""

    def fill(match: re.Match[str]) -> str:
        return env.get(match[1]) or match[2] or ""

    return re.sub(r"\$\{([A-Z_]+)(?::-([^}]*))?\}", fill, value)


def test_a_short_token_stops_every_relay_container() -> None:
    """Every relay container gets .env as its environment, so each one's command refuses a
    token shorter than 16 characters, in one line naming the setting, exit 2."""
    dot_env = _env_example(commented=False) | {"POSTBACK_OPS_TOKEN": "short"}
    base = clean_env()
    started: dict[str, subprocess.Popen[str]] = {}
    for name, service in _relay_services().items():
        assert service["env_file"] == ".env", name
        environment = {
            k: _filled_in(str(v), dot_env) for k, v in service.get("environment", {}).items()
        }
        started[name] = subprocess.Popen(
            [*POSTBACK, *service["command"]],
            env=base | dot_env | environment,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    said: dict[str, tuple[int, str]] = {}
    for name, process in started.items():
        try:
            _, stderr = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            _, stderr = process.communicate()
        leakcheck.logged(stderr)
        said[name] = (process.returncode, stderr)
    assert len(said) == 7
    for name, (code, stderr) in said.items():
        assert code == 2, (name, stderr)
        assert stderr.splitlines() == [
            "postback: error: bad configuration: POSTBACK_OPS_TOKEN: must be at least 16 "
            "characters; `openssl rand -hex 32` makes a good one"
        ], name


def _redis_options(command: list[str]) -> dict[str, str]:
    assert command[0] == "redis-server"
    options = command[1:]
    flags, values = options[::2], options[1::2]
    assert len(flags) == len(values)
    assert all(flag.startswith("--") for flag in flags)
    return {flag.removeprefix("--"): value for flag, value in zip(flags, values, strict=True)}


@pytest.mark.unit
def test_the_compose_file_and_the_image_are_as_the_readme_says() -> None:
    """README, "Run with Docker Compose": the table of services and the notes below it."""
    services = _compose()["services"]
    postgres, redis = services["postgres"], services["redis"]
    assert postgres["image"] == "postgres:15"
    assert "postgres-data:/var/lib/postgresql/data" in postgres["volumes"]
    assert "pg_isready" in postgres["healthcheck"]["test"]
    assert redis["image"] == "redis:7"
    assert "redis-data:/data" in redis["volumes"]
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    assert _redis_options(redis["command"]) == {
        "appendonly": "yes",
        "appendfsync": "everysec",
        "maxmemory-policy": "noeviction",
    }
    for name in ("postgres", "redis"):  # not published on the host
        assert "ports" not in services[name], name
        assert services[name].get("network_mode") is None, name

    healthy = {"condition": "service_healthy"}
    assert services["migrate"]["depends_on"] == {"postgres": healthy}
    for name in ("worker", "api"):
        assert services[name]["depends_on"] == {
            "migrate": {"condition": "service_completed_successfully"},
            "postgres": healthy,
            "redis": healthy,
        }, name
    assert services["worker"]["stop_grace_period"] == "30s"
    assert services["api"]["ports"] == ["${API_PUBLISH:-127.0.0.1:8080}:8080"]

    relay = _relay_services()
    assert set(relay) == {
        "migrate",
        "worker",
        "api",
        "demo-migrate",
        "demo-receiver",
        "demo-worker",
        "demo",
    }
    for name, service in relay.items():
        assert service["init"] is True, name
        assert service["env_file"] == ".env", name
    demo = {name for name, service in services.items() if "demo" in service.get("profiles", [])}
    assert demo == {"demo-postgres", "demo-migrate", "demo-receiver", "demo-worker", "demo"}
    assert "volumes" not in services["demo-postgres"]
    assert services["demo-receiver"]["networks"] == ["demo"]
    demo_worker = services["demo-worker"]["environment"]
    assert demo_worker["POSTBACK_RETRY_SCHEDULE"] == "1s"
    assert demo_worker["POSTBACK_REDIS_URL"].endswith("/1")
    assert demo_worker["POSTBACK_DATABASE_URL"].split("@")[1].startswith("demo-postgres:")

    # The image: python:3.11-slim, run as the unprivileged user postback (uid 10001), which
    # owns neither the code nor the virtual environment.
    dockerfile = DOCKERFILE.read_text()
    final = dockerfile.rsplit("\nFROM ", 1)[1]
    assert final.splitlines()[0] == "python:3.11-slim"
    useradd = re.search(r"^RUN useradd (.*?)(?<!\\)$", final, re.MULTILINE | re.DOTALL)
    assert useradd is not None
    words = useradd[1].replace("\\\n", " ").split()
    assert words[words.index("--uid") + 1] == "10001"
    assert words[-1] == "postback"
    assert re.findall(r"^USER (.*)$", final, re.MULTILINE) == ["postback"]
    assert "chown" not in final
    assert "chmod" not in final
    # The relay is installed from the wheel the build stage makes (tests/test_package.py
    # runs such a wheel): no source tree in the image, nothing editable.
    build = dockerfile.rsplit("\nFROM ", 1)[0]
    assert re.search(r"pip wheel .*--no-deps", build.replace("\\\n", " "))
    assert re.findall(r"^COPY (.*)$", final, re.MULTILINE) == [
        "--from=build /opt/venv /opt/venv",
        "--from=build /wheels /wheels",
    ]
    assert "/wheels/*.whl" in final
    assert not re.search(r"\s(-e|--editable)\s", dockerfile)
