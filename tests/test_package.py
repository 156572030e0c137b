"""`pip install .` gives a real package: the wheel, installed into a virtual environment of
its own, runs `postback` from any directory, with schema.sql, its upgrade steps and the ops
page inside it.

The wheel is built as the Dockerfile builds it: `pip wheel --no-deps` on the build context
(the tree less what .dockerignore leaves out). It is installed, without its dependencies,
into a new venv that borrows them from this one through a .pth file; the checkout and its
editable install stay out of that venv's reach, and every command runs in a directory
outside the repository.
"""

from __future__ import annotations

import asyncio
import fnmatch
import http.client
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import uuid
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest

from tests import leakcheck
from tests.support.ports import free_port
from tests.support.receivers import ALLOW_NETWORKS
from tests.support.schemas import TABLES
from tests.support.servers import RUN, database_at
from worker.schema import CURRENT

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("ops", "producer", "worker")
PAGE_FILES = ("index.html", "app.js", "overview.js", "style.css", "favicon.svg")
INGEST_TOKEN = "wheel-ingest-token-0123456789"
OPS_TOKEN = "wheel-ops-token-0123456789ab"
PIP = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--quiet"]


def _ignored(relative: str, patterns: list[str]) -> bool:
    """Whether .dockerignore leaves `relative` (a path under the root) out of the context."""
    name = relative.rsplit("/", 1)[-1]
    return any(
        fnmatch.fnmatch(name, pattern[3:])
        if pattern.startswith("**/")
        else fnmatch.fnmatch(relative, pattern)
        for pattern in patterns
    )


def _build_context(dest: Path) -> Path:
    """A copy of the tree as `docker build` gets it: without what .dockerignore names."""
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    # Exceptions would need Docker's full matching rules; none are used.
    assert not [p for p in patterns if p.startswith("!")], patterns

    def ignore(folder: str, names: list[str]) -> set[str]:
        base = Path(folder).relative_to(ROOT).as_posix()
        prefix = "" if base == "." else f"{base}/"
        return {name for name in names if _ignored(prefix + name, patterns)}

    shutil.copytree(ROOT, dest, symlinks=True, ignore=ignore)
    return dest


def _run(args: list[str], cwd: Path, env: dict[str, str], timeout: float = 60) -> str:
    result = subprocess.run(
        args,
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    leakcheck.logged(result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 0, result.stderr
    return result.stdout


@dataclass(frozen=True)
class Installed:
    """The wheel, and a venv that has it installed, with a folder outside the repository
    to run its commands in."""

    wheel: Path
    venv: Path
    site_packages: Path
    elsewhere: Path
    env: dict[str, str]

    def postback(self, *args: str, env: dict[str, str] | None = None, timeout: float = 60) -> str:
        """`postback ARGS`, run in the folder outside the repository; its stdout."""
        command = [str(self.venv / "bin" / "postback"), *args]
        return _run(command, self.elsewhere, self.env if env is None else env, timeout)

    def python(self, code: str) -> str:
        return _run([str(self.venv / "bin" / "python"), "-c", code], self.elsewhere, self.env)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    work = tmp_path_factory.mktemp("wheel")
    assert not work.is_relative_to(ROOT)
    context = _build_context(work / "context")
    wheels = work / "wheels"
    # Build isolation, as in the Dockerfile: pip gets the build backend pyproject.toml asks
    # for (from its cache after the first time), whatever this venv has installed.
    _run(
        [*PIP, "wheel", "--no-deps", "--wheel-dir", str(wheels), str(context)],
        work,
        dict(os.environ),
        timeout=180,
    )
    [wheel] = wheels.glob("postback_relay-*.whl")

    venv = work / "venv"
    python = venv / "bin" / "python"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], work, dict(os.environ))
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("POSTBACK_") and name not in ("PYTHONPATH", "PYTHONHOME")
    }
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = str(venv)
    # This venv's pip, run by the new venv's python: it installs there, with scripts that
    # start that python, before the new venv can see anything installed here.
    _run(
        [*PIP, "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)],
        work,
        env,
    )
    site_packages = Path(
        _run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            work,
            env,
        ).strip()
    )
    # The dependencies, from here, without downloading them again. A path in a .pth file
    # goes on sys.path after the venv's own site-packages, and the .pth files in it (the
    # editable install's finder among them) are not run.
    here = {sysconfig.get_paths()[kind] for kind in ("purelib", "platlib")}
    (site_packages / "zz_dependencies.pth").write_text("".join(f"{path}\n" for path in here))

    elsewhere = work / "elsewhere"
    elsewhere.mkdir()
    return Installed(wheel, venv, site_packages, elsewhere, env)


@pytest.fixture
def fresh_database_url(admin_url: str) -> Iterator[str]:
    """An empty database of the test's own: no tables until `postback db init` makes them."""
    name = f"postback_test_{RUN}_wheel_{uuid.uuid4().hex[:6]}"

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(admin_url)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    yield database_at(admin_url, name)
    asyncio.run(admin(f'DROP DATABASE "{name}" WITH (FORCE)'))


def _tables(database_url: str) -> set[str]:
    async def fetch() -> set[str]:
        conn = await asyncpg.connect(database_url)
        try:
            rows = await conn.fetch(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
            )
        finally:
            await conn.close()
        return {row["table_name"] for row in rows}

    return asyncio.run(fetch())


@pytest.mark.unit
def test_schema_sql_is_one_file_the_package_links_to() -> None:
    link = ROOT / "worker" / "schema.sql"
    assert link.is_symlink()
    assert os.readlink(link) == "../schema.sql"
    assert link.resolve() == ROOT / "schema.sql"
    assert not (ROOT / "schema.sql").is_symlink()


def test_the_wheel_holds_the_packages_the_schema_and_the_page(installed: Installed) -> None:
    steps = sorted((ROOT / "worker" / "upgrades").glob("*.sql"))
    with zipfile.ZipFile(installed.wheel) as wheel:
        names = wheel.namelist()
        schema = wheel.read("worker/schema.sql")
        held = [wheel.read(f"worker/upgrades/{step.name}") for step in steps]
    assert {name.split("/")[0] for name in names} == {
        *PACKAGES,
        installed.wheel.name.split("-py3")[0] + ".dist-info",
    }
    assert schema == (ROOT / "schema.sql").read_bytes()
    assert len(steps) == CURRENT - 1
    assert held == [step.read_bytes() for step in steps]
    assert {f"ops/service/page/{name}" for name in PAGE_FILES} <= set(names)


def test_the_installed_postback_is_the_wheel_not_the_checkout(installed: Installed) -> None:
    assert "usage: postback" in installed.postback("--help")
    found = installed.python(
        "import ops.cli.commands, ops.service.app, producer, worker.database, worker.schema\n"
        "print(ops.cli.commands.__file__, producer.__file__, worker.database.__file__, sep='\\n')\n"
        "print(worker.schema.SCHEMA)\n"
        "print(worker.schema.STEPS[worker.schema.CURRENT])\n"
        f"print(*(ops.service.app.PAGE / name for name in {PAGE_FILES!r}), sep='\\n')\n"
    ).splitlines()
    assert len(found) == 5 + len(PAGE_FILES)
    for path in map(Path, found):
        assert path.is_relative_to(installed.site_packages), path
        assert path.is_file(), path
        assert not path.is_symlink(), path
    assert Path(found[3]).read_bytes() == (ROOT / "schema.sql").read_bytes()
    last_step = ROOT / "worker" / "upgrades" / Path(found[4]).name
    assert Path(found[4]).read_bytes() == last_step.read_bytes()
    assert not list(installed.site_packages.glob("__editable__*"))
    assert (
        (installed.venv / "bin" / "postback")
        .read_text()
        .startswith(f"#!{installed.venv / 'bin' / 'python'}")
    )


def test_db_init_from_the_wheel_creates_the_tables(
    installed: Installed, fresh_database_url: str
) -> None:
    assert _tables(fresh_database_url) == set()
    env = {**installed.env, "POSTBACK_DATABASE_URL": fresh_database_url}
    assert installed.postback("db", "init", env=env) == f"schema created at version {CURRENT}\n"
    assert _tables(fresh_database_url) >= TABLES
    assert not (installed.elsewhere / ".postback").exists()


def _get(port: int, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def _relay_env(
    installed: Installed, database_url: str, redis_url: str, queue: str
) -> dict[str, str]:
    return {
        **installed.env,
        "POSTBACK_DATABASE_URL": database_url,
        "POSTBACK_REDIS_URL": redis_url,
        "POSTBACK_QUEUE_NAME": queue,
        "POSTBACK_ALLOW_NETWORKS": ALLOW_NETWORKS,
        "POSTBACK_INGEST_TOKEN": INGEST_TOKEN,
        "POSTBACK_OPS_TOKEN": OPS_TOKEN,
    }


def test_serve_from_the_wheel_serves_the_ops_page(
    installed: Installed, fresh_database_url: str, redis_url: str, queue_name: str
) -> None:
    leakcheck.register(INGEST_TOKEN, OPS_TOKEN)
    port = free_port()
    env = _relay_env(installed, fresh_database_url, redis_url, f"{queue_name}:wheel")
    serve = subprocess.Popen(
        [str(installed.venv / "bin" / "postback"), "serve", "--port", str(port)],
        cwd=installed.elsewhere,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                status, body = _get(port, "/")
                break
            except OSError:
                assert serve.poll() is None, "serve exited"
                assert time.monotonic() < deadline, "serve did not answer in 20 s"
                time.sleep(0.1)
        assert status == 200
        assert b"<title>postback relay \xc2\xb7 ops</title>" in body
        for name in PAGE_FILES:
            status, body = _get(port, f"/page/{name}")
            assert status == 200, name
            assert body == (ROOT / "ops" / "service" / "page" / name).read_bytes(), name
    finally:
        serve.send_signal(signal.SIGTERM)
        _, stderr = serve.communicate(timeout=30)
        leakcheck.logged(stderr)
    assert serve.returncode == 0, stderr


def test_the_demo_and_its_worker_run_from_the_wheel(
    installed: Installed, fresh_database_url: str, redis_url: str, queue_name: str
) -> None:
    """`postback demo` on the configured servers: it starts a worker and a receiver, and
    the postbacks go through the whole pipeline of the installed package."""
    env = _relay_env(installed, fresh_database_url, redis_url, f"{queue_name}:wheel-demo")
    installed.postback("db", "init", env=env)
    out = installed.postback("demo", env=env, timeout=120)
    # The demo's ledger (tests/test_cli.py checks the rest of its output): every postback
    # delivered but dan's (a 404: dead at once), bob's create on its second attempt, carol's
    # event skipped.
    ledger = out.split("\nledger:\n", 1)[1].splitlines()
    assert [line.split()[1:4] for line in ledger] == [
        ["demo-ann", "delivered", "1"],
        ["demo-bob", "delivered", "2"],
        ["demo-ann", "delivered", "1"],
        ["demo-bob", "delivered", "1"],
        ["demo-carol", "skipped", "no"],
        ["demo-dan", "dead", "HTTP"],
    ]
    # And `postback worker` itself, on the demo's (now empty) queue.
    installed.postback("worker", "--burst", env=env)
    assert not (installed.elsewhere / ".postback").exists()
