"""`python -m imagecheck`: the image built from the Dockerfile and run with podman, then
docker-compose.yml brought up with podman-compose (README: "Checked here with podman").

Run it as root on Debian bookworm, with Postgres on 127.0.0.1:5432 (user postgres, trust
auth), Redis on 127.0.0.1:6379, and Debian's mirror and PyPI reachable. It:

1. installs podman, podman-compose, catatonit (podman's `--init`) and debootstrap with
   apt-get when one is missing, and points CONTAINERS_CONF at this folder's
   containers.conf;
2. builds stand-ins for the images no registry here can give, python:3.11-slim,
   postgres:15 and redis:7, from Debian's packages on a debootstrapped bookworm
   (standins/), and tags them with those names. Later runs reuse them (`--fresh`: build
   them again);
3. builds the Dockerfile as it is, tagged postback-relay:latest as docker-compose.yml
   names it;
4. runs each role on the host's network against the host's Postgres (a database of its
   own, dropped after) and Redis (database 13, its keys deleted after): `db init`,
   `callbacks set`, `worker` and `serve` (healthz 200); one event posted to
   `POST /v1/events` and delivered to a receiver in this process; the worker's processes
   run as uid 10001 and cannot write the code or the venv; a second event sent with
   `postback send`, whose receiver answers SLOW_SECONDS late, and SIGTERM to the worker
   while it waits: the worker exits 0 within POSTBACK_SHUTDOWN_WAIT and the delivery is
   recorded as delivered;
5. brings up docker-compose.yml with podman-compose, then the demo profile, sees the demo's
   postbacks reach its receiver, stops the worker (exit 0) and tears everything down.
   podman-compose 1.0.3 (Debian bookworm's) cannot do everything the file asks; what it
   cannot, this script does, as said where it does it.

It prints each step's time and the image's size at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import http.server
import json
import math
import os
import re
import secrets
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")

SUITE = "bookworm"
BASE_IMAGE = f"localhost/postback-standin-debian:{SUITE}"
RELAY_IMAGE = "postback-relay:latest"
USER_ID = 10001
"""The Dockerfile's `postback` user."""

PACKAGES = {
    "podman": "podman",
    "podman-compose": "podman-compose",
    "catatonit": "catatonit",
    "debootstrap": "debootstrap",
}
"""Debian package: the command it brings."""
HOST_TOOLS = ("psql", "pg_isready", "redis-cli")

POSTGRES = "127.0.0.1:5432"
REDIS_DB = 13
"""The tests use Redis database 15 and the bench 14."""
SHUTDOWN_WAIT = 20
"""POSTBACK_SHUTDOWN_WAIT for the worker here: its default."""
SLOW_SECONDS = 3.0
SLOW_ORDER = "IC-SLOW"
PROJECT = "postback-imagecheck"
"""The podman-compose project: its containers, networks and volumes carry its name."""


@dataclass(frozen=True)
class StandIn:
    folder: str
    """Under standins/: its Containerfile, and its entrypoint if it has one."""
    image: str
    """What it is built as; kept between runs."""
    name: str
    """The name the Dockerfile or docker-compose.yml uses, tagged on it."""


STANDINS = (
    StandIn("python", "localhost/postback-standin-python:3.11", "python:3.11-slim"),
    StandIn("postgres", "localhost/postback-standin-postgres:15", "postgres:15"),
    StandIn("redis", "localhost/postback-standin-redis:7", "redis:7"),
)


class CheckFailed(Exception):
    pass


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


# --- running commands -------------------------------------------------------------------


def run(
    *args: str,
    check: bool = True,
    capture: bool = False,
    quiet: bool = False,
    timeout: float = 300,
    input_text: str | None = None,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command, echoed unless `quiet`; `check`: a non-zero exit fails the check."""
    if not quiet:
        print("+ " + shlex.join(args), flush=True)
    try:
        # The commands are this script's own.
        result = subprocess.run(  # noqa: S603
            args,
            check=False,
            text=True,
            capture_output=capture,
            timeout=timeout,
            input=input_text,
            env=None if env is None else {**os.environ, **env},
        )
    except subprocess.TimeoutExpired:
        raise CheckFailed(f"`{shlex.join(args)}` took more than {timeout:.0f} s") from None
    if check and result.returncode != 0:
        detail = f":\n{result.stderr.strip()[-3000:]}" if capture and result.stderr else ""
        raise CheckFailed(f"`{shlex.join(args)}` exited {result.returncode}{detail}")
    return result


def output(*args: str, timeout: float = 60) -> str:
    return run(*args, capture=True, quiet=True, timeout=timeout).stdout.strip()


def until(what: str, timeout: float, probe: Callable[[], bool], every: float = 0.5) -> None:
    deadline = time.monotonic() + timeout
    while not probe():
        if time.monotonic() > deadline:
            raise CheckFailed(f"{what}: not within {timeout:.0f} s")
        time.sleep(every)


def image_exists(name: str) -> bool:
    return run("podman", "image", "exists", name, check=False, quiet=True).returncode == 0


def image_id(name: str) -> str:
    return output("podman", "image", "inspect", "--format", "{{.Id}}", name)


def image_mb(name: str) -> float:
    return int(output("podman", "image", "inspect", "--format", "{{.Size}}", name)) / 1e6


def dump_logs(containers: list[str], lines: int = 40) -> None:
    for name in containers:
        print(f"--- last {lines} log lines of {name}", flush=True)
        run("podman", "logs", "--tail", str(lines), name, check=False, quiet=True)


@dataclass
class Timings:
    rows: list[tuple[str, float, bool]] = field(default_factory=list)

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        print(f"\n=== {name}", flush=True)
        start = time.monotonic()
        ok = False
        try:
            yield
            ok = True
        finally:
            self.rows.append((name, time.monotonic() - start, ok))

    def report(self, started: float) -> None:
        print("\nstep times:")
        for name, seconds, ok in self.rows:
            print(f"  {seconds:7.1f} s  {name}{'' if ok else '  (FAILED)'}")
        print(f"  {time.monotonic() - started:7.1f} s  in all")


# --- the machine ------------------------------------------------------------------------


def prerequisites() -> None:
    expect(os.geteuid() == 0, "run as root: it installs packages and runs podman as root")
    missing = [package for package, command in PACKAGES.items() if not shutil.which(command)]
    if missing:
        apt_env = {"DEBIAN_FRONTEND": "noninteractive"}
        run("apt-get", "update", "-qq", env=apt_env, timeout=900)
        run("apt-get", "install", "-y", "-qq", *missing, env=apt_env, timeout=1800)
    absent = [tool for tool in HOST_TOOLS if not shutil.which(tool)]
    expect(not absent, f"{', '.join(absent)} not found: the host's Postgres and Redis tools")
    host, port = POSTGRES.split(":")
    ready = run("pg_isready", "-q", "-h", host, "-p", port, check=False, quiet=True)
    expect(ready.returncode == 0, f"no Postgres answers on {POSTGRES}")
    pong = run("redis-cli", "-h", "127.0.0.1", "ping", check=False, capture=True, quiet=True)
    expect(pong.stdout.strip() == "PONG", "no Redis answers on 127.0.0.1:6379")
    # Only this file configures podman here (see containers.conf).
    os.environ["CONTAINERS_CONF"] = str(HERE / "containers.conf")
    said = output("podman-compose", "--version").splitlines()
    compose_version = next((line for line in said if "compose" in line), "podman-compose ?")
    print(f"{output('podman', '--version')}; {' '.join(compose_version.split())}")


def apt_sources() -> list[tuple[str, list[str]]]:
    """(URI, suites) of each `deb` source this machine's apt uses, one-line and deb822."""
    found: list[tuple[str, list[str]]] = []
    etc = Path("/etc/apt")
    for path in [etc / "sources.list", *sorted(etc.glob("sources.list.d/*.list"))]:
        if not path.is_file():
            continue
        for line in path.read_text().splitlines():
            words = line.split("#", 1)[0].split()
            if not words or words[0] != "deb":
                continue
            words = words[1:]
            if words and words[0].startswith("["):
                while words and not words[0].endswith("]"):
                    words.pop(0)
                words = words[1:]
            if len(words) >= 2:
                found.append((words[0], [words[1]]))
    for path in sorted(etc.glob("sources.list.d/*.sources")):
        for stanza in re.split(r"\n\s*\n", path.read_text()):
            fields: dict[str, str] = {}
            for line in stanza.splitlines():
                if line.startswith("#") or ":" not in line or line[:1].isspace():
                    continue
                key, value = line.split(":", 1)
                fields[key.strip().lower()] = value.strip()
            if "deb" in fields.get("types", "").split() and fields.get("enabled") != "no":
                found.extend(
                    (uri, fields.get("suites", "").split()) for uri in fields["uris"].split()
                )
    return found


def mirror(suite: str, default: str) -> str:
    """The mirror this machine's apt uses for `suite`."""
    return next((uri for uri, suites in apt_sources() if suite in suites), default)


# --- the stand-ins ----------------------------------------------------------------------


def names_used() -> set[str]:
    """The images the Dockerfile builds FROM and the compose file runs, but the relay's."""
    text = DOCKERFILE.read_text()
    args = dict(re.findall(r"^ARG\s+(\w+)=(\S+)", text, re.MULTILINE))
    used: set[str] = set()
    stages: set[str] = set()
    for image, stage in re.findall(r"^FROM\s+(\S+)(?:\s+AS\s+(\S+))?", text, re.M | re.I):
        image = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), image)
        if image not in stages:
            used.add(image)
        if stage:
            stages.add(stage)
    services = compose_file()["services"].values()
    used |= {s["image"] for s in services if "image" in s and s["image"] != RELAY_IMAGE}
    return used


def compose_file() -> dict[str, Any]:
    # PyYAML: in the venv (the dev extra), and Debian's python3-yaml, which podman-compose
    # needs, for the system's Python.
    import yaml

    loaded: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return loaded


_APT_RM = (
    '"rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb'
    ' /var/cache/apt/*.bin || true"'
)
APT_CLEAN = (
    f"DPkg::Post-Invoke {{ {_APT_RM}; }};\n"
    f"APT::Update::Post-Invoke {{ {_APT_RM}; }};\n"
    'Dir::Cache::pkgcache "";\n'
    'Dir::Cache::srcpkgcache "";\n'
)
"""Debian's container images' apt settings: no package files or caches kept."""

DPKG_SLIM = """\
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
"""


def slim(rootfs: Path, main: str, security: str) -> None:
    """What Debian's own bookworm-slim image has that debootstrap leaves out: apt sources
    with updates and security, no service started by a package's install, no apt caches,
    and no documentation, manual pages or translations."""
    (rootfs / "etc/apt/sources.list").unlink(missing_ok=True)
    keyring = "/usr/share/keyrings/debian-archive-keyring.gpg"
    (rootfs / "etc/apt/sources.list.d/debian.sources").write_text(
        f"Types: deb\nURIs: {main}\nSuites: {SUITE} {SUITE}-updates\nComponents: main\n"
        f"Signed-By: {keyring}\n\n"
        f"Types: deb\nURIs: {security}\nSuites: {SUITE}-security\nComponents: main\n"
        f"Signed-By: {keyring}\n"
    )
    policy = rootfs / "usr/sbin/policy-rc.d"
    policy.write_text("#!/bin/sh\n# No service starts while an image is built.\nexit 101\n")
    policy.chmod(0o755)
    (rootfs / "etc/apt/apt.conf.d/docker-clean").write_text(APT_CLEAN)
    (rootfs / "etc/dpkg/dpkg.cfg.d/docker").write_text(DPKG_SLIM)
    for pattern in ("var/cache/apt/archives/*.deb", "var/cache/apt/*.bin", "var/lib/apt/lists/*_*"):
        for path in rootfs.glob(pattern):
            path.unlink()
    keep = {"copyright", "locale.alias"}
    for folder in ("doc", "locale", "man", "groff", "info", "lintian"):
        # Bottom up, and never through a link: an absolute one points into the host.
        for top, dirs, files in os.walk(rootfs / "usr/share" / folder, topdown=False):
            for name in files + [d for d in dirs if os.path.islink(os.path.join(top, d))]:
                if name not in keep:
                    os.unlink(os.path.join(top, name))
            if top != str(rootfs / "usr/share" / folder) and not os.listdir(top):
                os.rmdir(top)


def build_base() -> None:
    main = mirror(SUITE, "http://deb.debian.org/debian")
    security = mirror(f"{SUITE}-security", "http://deb.debian.org/debian-security")
    with tempfile.TemporaryDirectory(prefix="postback-standin-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        run("debootstrap", "--variant=minbase", SUITE, str(rootfs), main, timeout=1800)
        slim(rootfs, main, security)
        tarball = Path(tmp) / "rootfs.tar"
        run("tar", "-C", str(rootfs), "-cf", str(tarball), ".", timeout=600)
        path = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        changes = ("--change", f"ENV {path}", "--change", 'CMD ["bash"]')
        run("podman", "import", *changes, str(tarball), BASE_IMAGE, timeout=600)


def build_standin(standin: StandIn) -> None:
    with tempfile.TemporaryDirectory(prefix="postback-standin-") as tmp:
        context = Path(tmp) / standin.folder
        shutil.copytree(HERE / "standins" / standin.folder, context)
        if standin.folder == "python":
            shutil.copy(CA_BUNDLE, context / "ca-certificates.crt")
        build_arg = f"BASE={BASE_IMAGE}"
        run(
            "podman",
            "build",
            "--build-arg",
            build_arg,
            "-t",
            standin.image,
            str(context),
            timeout=1800,
        )


def standins(timings: Timings, fresh: bool) -> None:
    unknown = names_used() - {standin.name for standin in STANDINS}
    expect(not unknown, f"no stand-in here for {', '.join(sorted(unknown))} (standins/)")
    to_build = [s for s in STANDINS if fresh or not image_exists(s.image)]
    if to_build and (fresh or not image_exists(BASE_IMAGE)):
        with timings.step(f"stand-in base: debootstrap {SUITE} (minbase), podman import"):
            build_base()
    for standin in to_build:
        with timings.step(f"stand-in {standin.name}: podman build"):
            build_standin(standin)
    for standin in STANDINS:
        if standin not in to_build:
            print(f"stand-in {standin.name}: {standin.image} exists, reused")
        run("podman", "tag", standin.image, standin.name, quiet=True)
        # A short name resolves to an image here, not a registry: make sure it is this one.
        resolved = image_id(standin.name)
        expect(
            resolved == image_id(standin.image),
            f"{standin.name} resolves to image {resolved[:12]} here, not the stand-in",
        )


def build_relay(timings: Timings) -> None:
    digest = hashlib.sha256(DOCKERFILE.read_bytes()).hexdigest()[:12]
    state = "git not available"
    if shutil.which("git"):
        status = run(
            "git",
            "-C",
            str(ROOT),
            "status",
            "--porcelain",
            "--",
            "Dockerfile",
            check=False,
            capture=True,
            quiet=True,
        )
        if status.returncode == 0:
            state = "changed since the last commit" if status.stdout.strip() else "as committed"
    print(f"Dockerfile sha256 {digest}…, {state}")
    with timings.step("image: podman build of the Dockerfile"):
        run("podman", "build", "-t", RELAY_IMAGE, "-f", str(DOCKERFILE), str(ROOT), timeout=3600)


# --- the roles, on the host's network ---------------------------------------------------


class Receiver:
    """The affiliate's server: answers every GET 200, SLOW_SECONDS late for SLOW_ORDER."""

    def __init__(self) -> None:
        self.answered: dict[str, bool] = {}
        """Event id (the last part of the path): answered yet."""
        self.changed = threading.Condition()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                receiver.handle(self)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def handle(self, request: http.server.BaseHTTPRequestHandler) -> None:
        url = urllib.parse.urlsplit(request.path)
        event_id = url.path.rsplit("/", 1)[-1]
        print(f"receiver got: GET {request.path}", flush=True)
        with self.changed:
            self.answered[event_id] = False
            self.changed.notify_all()
        if urllib.parse.parse_qs(url.query).get("order") == [SLOW_ORDER]:
            time.sleep(SLOW_SECONDS)
        request.send_response(200)
        request.send_header("Content-Length", "2")
        request.end_headers()
        request.wfile.write(b"ok")
        with self.changed:
            self.answered[event_id] = True
            self.changed.notify_all()

    def wait(self, event_id: str, answered: bool, timeout: float) -> bool:
        with self.changed:
            return self.changed.wait_for(
                lambda: (
                    self.answered.get(event_id, False)
                    or (not answered and event_id in self.answered)
                ),
                timeout,
            )

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def request_json(
    method: str, url: str, token: str | None = None, body: object = None
) -> tuple[int, Any]:
    """(status, JSON body) of a request to 127.0.0.1; (0, the error) if none came back."""
    data = None if body is None else json.dumps(body).encode()
    # Only ever http://127.0.0.1.
    request = urllib.request.Request(url, data=data, method=method)  # noqa: S310
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with _opener.open(request, timeout=10) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode(errors="replace")
    except (urllib.error.URLError, OSError) as error:
        return 0, str(error)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def psql(sql: str) -> None:
    host, port = POSTGRES.split(":")
    run(
        "psql",
        "-q",
        "-h",
        host,
        "-p",
        port,
        "-U",
        "postgres",
        "-d",
        "postgres",
        "-v",
        "ON_ERROR_STOP=1",
        "-c",
        sql,
        timeout=60,
    )


def delete_redis_keys(pattern: str) -> None:
    keys = run(
        "redis-cli", "-n", str(REDIS_DB), "--scan", "--pattern", pattern, capture=True, quiet=True
    ).stdout.split()
    for start in range(0, len(keys), 500):
        batch = keys[start : start + 500]
        run("redis-cli", "-n", str(REDIS_DB), "DEL", *batch, capture=True, quiet=True)
    print(f"deleted {len(keys)} Redis key(s) matching {pattern} in database {REDIS_DB}")


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants, from the host's /proc."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents[int(stat.parent.name)] = int(fields[1])
    tree = [pid]
    for member in tree:
        tree.extend(child for child, parent in parents.items() if parent == member)
    return tree


WRITE_PROBE = """
import json, os, sys, sysconfig, ops
code = os.path.dirname(ops.__file__)
tries = {
    "a new file beside the code": os.path.join(code, "imagecheck-probe"),
    "the code itself": ops.__file__,
    "a new file in the venv": os.path.join(sys.prefix, "imagecheck-probe"),
    "a new file in the venv's bin": os.path.join(sys.prefix, "bin", "imagecheck-probe"),
    "a new file in site-packages": os.path.join(
        sysconfig.get_paths()["purelib"], "imagecheck-probe"),
}
writes = {}
for what, path in tries.items():
    existed = os.path.exists(path)
    try:
        with open(path, "a"):
            pass
    except PermissionError:
        writes[what] = "refused"
    else:
        writes[what] = "WRITABLE"
        if not existed:
            os.remove(path)
print(json.dumps({"uid": os.getuid(), "code": code, "venv": sys.prefix, "writes": writes}))
"""


def check_roles(timings: Timings) -> None:
    run_id = f"imagecheck-{int(time.time())}-{os.getpid()}"
    affiliate = run_id
    database = run_id.replace("-", "_")
    api_port = free_port()
    api = f"http://127.0.0.1:{api_port}"
    ingest_token, ops_token = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    env = {
        "POSTBACK_DATABASE_URL": f"postgresql://postgres@{POSTGRES}/{database}",
        "POSTBACK_REDIS_URL": f"redis://127.0.0.1:6379/{REDIS_DB}",
        "POSTBACK_QUEUE_NAME": f"postback:{run_id}",
        # The receiver is on loopback, which the SSRF policy refuses unless allowed.
        "POSTBACK_ALLOW_NETWORKS": "127.0.0.1/32",
        "POSTBACK_INGEST_TOKEN": ingest_token,
        "POSTBACK_OPS_TOKEN": ops_token,
        "POSTBACK_SHUTDOWN_WAIT": str(SHUTDOWN_WAIT),
    }
    # `-e NAME`: podman takes the value from its own environment, so no token is echoed.
    # --init: the compose file's `init: true`.
    relay = ["podman", "run", "--network", "host", "--init"]
    relay += [arg for name in env for arg in ("-e", name)]
    worker, server = f"{run_id}-worker", f"{run_id}-serve"
    events = [
        {
            "id": f"{run_id}-{n}",
            "type": "order.created",
            "affiliate_id": affiliate,
            "order": {"number": number, "amount": "10.50", "commission": "1.05"},
            "link": {"url": "https://shop.example/?sub_id=imagecheck"},
        }
        for n, number in ((1, "IC-1"), (2, SLOW_ORDER))
    ]
    receiver = Receiver()

    def delivery(event_id: str) -> dict[str, Any] | None:
        query = urllib.parse.urlencode({"affiliate": affiliate})
        status, body = request_json("GET", f"{api}/v1/deliveries?{query}", ops_token)
        items = body["items"] if status == 200 else []
        return next((item for item in items if item["event_id"] == event_id), None)

    def delivered(event_id: str) -> bool:
        found = delivery(event_id)
        return found is not None and found["state"] == "delivered"

    with contextlib.ExitStack() as cleanup:
        cleanup.callback(receiver.close)
        psql(f'CREATE DATABASE "{database}"')
        cleanup.callback(psql, f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        cleanup.callback(delete_redis_keys, f"*{run_id}*")
        try:
            with timings.step("roles: db init"):
                run(*relay, "--rm", RELAY_IMAGE, "db", "init", env=env)
            with timings.step("roles: callbacks set (to a receiver in this process)"):
                url = f"http://127.0.0.1:{receiver.port}/hook/{{{{event.id}}}}"
                url += "?order={{order.number}}"
                run(
                    *relay,
                    "--rm",
                    RELAY_IMAGE,
                    "callbacks",
                    "set",
                    "--affiliate",
                    affiliate,
                    "--event",
                    "order.created",
                    "--url",
                    url,
                    env=env,
                )
            with timings.step("roles: worker and serve started, healthz 200"):
                for name, command in (
                    (worker, ["worker"]),
                    (server, ["serve", "--host", "127.0.0.1", "--port", str(api_port)]),
                ):
                    cleanup.callback(run, "podman", "rm", "-f", "-t", "0", name, check=False)
                    run(*relay, "-d", "--name", name, RELAY_IMAGE, *command, env=env)
                until(
                    "GET /healthz answers 200",
                    60,
                    lambda: request_json("GET", f"{api}/healthz")[0] == 200,
                )
                print("healthz:", request_json("GET", f"{api}/healthz")[1])
            with timings.step("roles: one event, POST /v1/events, delivered end to end"):
                status, body = request_json("POST", f"{api}/v1/events", ingest_token, events[0])
                expect(status == 202, f"POST /v1/events answered {status}: {body}")
                expect(receiver.wait(str(events[0]["id"]), True, 30), "no postback arrived in 30 s")
                until("the ledger says delivered", 30, lambda: delivered(str(events[0]["id"])))
                print("ledger:", delivery(str(events[0]["id"])))
            with timings.step("roles: the worker runs as uid 10001 and cannot write its code"):
                check_user(worker)
            with timings.step("roles: SIGTERM with a delivery in flight, exit 0"):
                slow = str(events[1]["id"])
                run(
                    *relay,
                    "--rm",
                    "-i",
                    RELAY_IMAGE,
                    "send",
                    "--file",
                    "-",
                    input_text=json.dumps(events[1]),
                    env=env,
                )
                expect(receiver.wait(slow, False, 30), "the second postback never arrived")
                stopped = time.monotonic()
                # SIGTERM, as compose's stop, and SIGKILL after stop_grace_period (30 s).
                run("podman", "stop", "--time", "30", worker, timeout=60)
                took = time.monotonic() - stopped
                code = output("podman", "inspect", "--format", "{{.State.ExitCode}}", worker)
                print(f"worker exited {code}, {took:.1f} s after SIGTERM")
                expect(code == "0", f"the worker exited {code} on SIGTERM")
                expect(took < SHUTDOWN_WAIT, f"the worker took {took:.1f} s to stop")
                expect(receiver.wait(slow, True, 0), "the delivery in flight was not answered")
                until("the delivery in flight recorded", 10, lambda: delivered(slow))
                recorded = delivery(slow)
                print("ledger:", recorded)
                expect(recorded is not None and recorded["attempts"] == 1, "not one attempt")
        except CheckFailed:
            dump_logs([worker, server])
            raise


def check_user(container: str) -> None:
    pid = int(output("podman", "inspect", "--format", "{{.State.Pid}}", container))
    commands: list[str] = []
    for member in process_tree(pid):
        status = Path(f"/proc/{member}/status").read_text()
        uids = re.search(r"^Uid:\s+(.*)$", status, re.MULTILINE)
        command = Path(f"/proc/{member}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        print(f"pid {member}: uids {uids.group(1) if uids else '?'}: {command.strip()}")
        expect(
            uids is not None and set(uids.group(1).split()) == {str(USER_ID)},
            f"process {member} ({command.strip()}) does not run as uid {USER_ID}",
        )
        commands.append(command)
    expect(any("postback worker" in command for command in commands), "no `postback worker`")
    probe = json.loads(output("podman", "exec", container, "python", "-c", WRITE_PROBE))
    print(json.dumps(probe, indent=2))
    expect(probe["uid"] == USER_ID, f"podman exec ran as uid {probe['uid']}")
    writable = [what for what, result in probe["writes"].items() if result != "refused"]
    expect(not writable, f"uid {USER_ID} can write {', '.join(writable)}")


# --- docker-compose.yml with podman-compose ---------------------------------------------


def seconds(duration: str) -> float:
    """A compose duration, e.g. 1m30s."""
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", duration)
    return sum(float(number) * units[unit] for number, unit in parts)


class ComposeRun:
    """podman-compose for what it does; the rest of what docker-compose.yml asks for, done
    here with podman in the same way docker compose does it."""

    def __init__(self, project_dir: Path) -> None:
        self.spec = compose_file()
        self.services: dict[str, dict[str, Any]] = self.spec["services"]
        # podman-compose 1.0.3 knows no implicit `default` network: when a file declares
        # others, it puts every service without `networks:` on the one declared (here `demo`,
        # which only demo-worker may reach) and fails on a service that names `default`
        # (KeyError: 'default'). Declared in a second file, `default` is what Compose
        # makes of it anyway.
        networks = project_dir / "default-network.yml"
        networks.write_text("networks:\n  default: {}\n")
        self.command = (
            "podman-compose",
            "-p",
            PROJECT,
            "-f",
            str(project_dir / "docker-compose.yml"),
            "-f",
            str(networks),
        )
        self.started: set[str] = set()
        self.settled: set[tuple[str, str]] = set()
        # podman-compose 1.0.3 reads no stop_grace_period: `stop` and `down` get it as -t
        # (whole seconds), or would wait 10 s.
        self.grace = max(
            math.ceil(seconds(spec.get("stop_grace_period", "10s")))
            for spec in self.services.values()
        )

    @staticmethod
    def container(service: str) -> str:
        return f"{PROJECT}_{service}_1"

    def compose(self, *args: str, timeout: float = 300, check: bool = True) -> None:
        """podman-compose, showing the podman commands it ran; all it said if it failed."""
        result = run(*self.command, *args, timeout=timeout, check=False, capture=True)
        said = result.stdout + result.stderr
        if result.returncode != 0:
            print(said, flush=True)
            expect(not check, f"podman-compose {' '.join(args)} exited {result.returncode}")
            return
        for line in said.splitlines():
            if line.startswith("podman "):
                print(f"  {line}", flush=True)

    def depends_on(self, service: str) -> dict[str, str]:
        given = self.services[service].get("depends_on") or {}
        if isinstance(given, list):
            return dict.fromkeys(given, "service_started")
        return {
            name: (spec or {}).get("condition", "service_started") for name, spec in given.items()
        }

    def up(self, service: str) -> None:
        """Start `service` once each of its dependencies is as its `condition` says: what
        podman-compose 1.0.3 does not wait for."""
        if service in self.started:
            return
        for dependency, condition in self.depends_on(service).items():
            self.up(dependency)
            self.wait(dependency, condition)
        self.compose("start", service)
        self.started.add(service)

    def wait(self, service: str, condition: str) -> None:
        if (service, condition) in self.settled or condition == "service_started":
            return
        name = self.container(service)
        if condition == "service_healthy":
            check = self.services[service]["healthcheck"]
            limit = seconds(check.get("start_period", "0s")) + seconds(
                check.get("interval", "30s")
            ) * int(check.get("retries", 3))
            print(
                f"waiting for {service}'s healthcheck test to pass (up to {limit:.0f} s)",
                flush=True,
            )
            until(f"{service} healthy", limit, lambda: self.healthy(name, check), every=1)
        elif condition == "service_completed_successfully":
            code = output("podman", "wait", name, timeout=300)
            expect(code == "0", f"{service} exited {code}")
        else:
            raise CheckFailed(f"depends_on condition {condition} is not one this check knows")
        print(f"{service}: {condition}", flush=True)
        self.settled.add((service, condition))

    @staticmethod
    def healthy(name: str, check: dict[str, Any]) -> bool:
        """The service's healthcheck test, run in its container as Docker runs it.

        Not `podman healthcheck run`: podman-compose 1.0.3 turns an exec-form (CMD) test
        into a shell command line without quoting its arguments right, so the api's
        (`python -c '...'`) always fails there. And podman runs no healthcheck by itself
        where systemd is not running, as here.
        """
        test = check["test"]
        if isinstance(test, str):
            argv = ["/bin/sh", "-c", test]
        elif test[0] == "CMD-SHELL":
            argv = ["/bin/sh", "-c", test[1]]
        else:
            argv = test[1:]
        timeout = seconds(check.get("timeout", "30s"))
        try:
            probe = run(
                "podman",
                "exec",
                name,
                *argv,
                check=False,
                capture=True,
                quiet=True,
                timeout=timeout,
            )
        except CheckFailed:  # timed out
            return False
        return probe.returncode == 0

    def labelled(self, kind: str) -> list[str]:
        """This project's containers, networks or volumes, by podman-compose's label."""
        name = "{{.Names}}" if kind == "ps" else "{{.Name}}"
        args = ["ps", "-a"] if kind == "ps" else [kind, "ls"]
        found = output(
            "podman",
            *args,
            "--filter",
            f"label=io.podman.compose.project={PROJECT}",
            "--format",
            name,
        )
        return found.split()

    def remove_everything(self) -> None:
        """This project's containers, volumes and networks: `down` leaves the networks."""
        for container in self.labelled("ps"):
            run("podman", "rm", "-f", "-t", "0", container, check=False)
        for volume in self.labelled("volume"):
            run("podman", "volume", "rm", "-f", volume, check=False)
        for network in self.labelled("network"):
            run("podman", "network", "rm", "-f", network, check=False)

    def check_networks(self) -> None:
        """Each container is on the networks its service names, `default` if none."""
        for service, spec in self.services.items():
            named = list(spec.get("networks") or ["default"])  # a list, or a mapping
            expected = {f"{PROJECT}_{network}" for network in named}
            found = output(
                "podman",
                "inspect",
                "--format",
                "{{json .NetworkSettings.Networks}}",
                self.container(service),
            )
            on = set(json.loads(found) or {})
            expect(on == expected, f"{service} is on {sorted(on)}, not {sorted(expected)}")
        print("each container is on the networks its service names")

    def create_networks(self) -> None:
        """The networks with a subnet in the file: podman-compose 1.0.3 makes networks
        without their `ipam` settings, so it would give `demo` a subnet of podman's choosing,
        outside POSTBACK_ALLOW_NETWORKS. It uses a network that exists."""
        for network, spec in (self.spec.get("networks") or {}).items():
            configs = ((spec or {}).get("ipam") or {}).get("config") or []
            subnets = [arg for config in configs for arg in ("--subnet", config["subnet"])]
            if subnets:
                run(
                    "podman",
                    "network",
                    "create",
                    *subnets,
                    "--label",
                    f"io.podman.compose.project={PROJECT}",
                    f"{PROJECT}_{network}",
                )


def write_env(path: Path, api_port: int) -> None:
    """.env from .env.example, as a user makes it: both tokens set, and the API published on
    a free port of 127.0.0.1 (8080 may be taken here)."""
    values = {
        "POSTBACK_INGEST_TOKEN": secrets.token_urlsafe(24),
        "POSTBACK_OPS_TOKEN": secrets.token_urlsafe(24),
        "API_PUBLISH": f"127.0.0.1:{api_port}",
    }
    lines = []
    for line in ENV_EXAMPLE.read_text().splitlines():
        name = line.split("=", 1)[0]
        lines.append(f"{name}={values[name]}" if name in values else line)
    path.write_text("\n".join(lines) + "\n")


def check_compose(timings: Timings) -> None:
    with tempfile.TemporaryDirectory(prefix="postback-imagecheck-") as tmp:
        project_dir = Path(tmp)
        # A copy, beside a .env of its own: the working tree's .env is left alone.
        shutil.copy(COMPOSE, project_dir / "docker-compose.yml")
        api_port = free_port()
        write_env(project_dir / ".env", api_port)
        stack = ComposeRun(project_dir)
        everything = list(stack.services)
        demo = [name for name in everything if "demo" in stack.services[name].get("profiles", [])]
        production = [name for name in everything if not stack.services[name].get("profiles")]
        stack.remove_everything()  # what an interrupted run left
        try:
            with timings.step("compose: podman-compose up --no-start (every service)"):
                stack.create_networks()
                # --no-build: the image was just built from the same Dockerfile, and tagged
                # as the file names it. --no-start: podman-compose would start every
                # service at once, the demo's too (it has no profiles), without waiting
                # for any depends_on condition.
                stack.compose("up", "--no-build", "--no-start")
                stack.check_networks()
            with timings.step("compose: production services started, api healthy"):
                for service in production:
                    stack.up(service)
                stack.wait("api", "service_healthy")
                status, body = request_json("GET", f"http://127.0.0.1:{api_port}/healthz")
                print(f"healthz on the published port: {status} {body}")
                expect(status == 200, f"healthz on the published port answered {status}")
            with timings.step("compose: the demo profile, postbacks at demo-receiver"):
                for service in demo:
                    stack.up(service)
                code = output("podman", "wait", stack.container("demo"), timeout=300)
                run("podman", "logs", stack.container("demo"))
                expect(code == "0", f"the demo exited {code}")
                received = output("podman", "logs", stack.container("demo-receiver"))
                print(received)
                arrived = received.count("receiver got:")
                print(f"demo-receiver got {arrived} postbacks")
                expect(arrived > 0, "no postback reached demo-receiver")
            with timings.step("compose: podman-compose stop worker, exit 0"):
                grace = seconds(stack.services["worker"].get("stop_grace_period", "10s"))
                stack.compose("stop", "-t", str(math.ceil(grace)), "worker", timeout=grace + 30)
                code = output(
                    "podman",
                    "inspect",
                    "--format",
                    "{{.State.ExitCode}}",
                    stack.container("worker"),
                )
                expect(code == "0", f"the worker exited {code} on SIGTERM")
        except CheckFailed:
            dump_logs(stack.labelled("ps"), lines=25)
            raise
        finally:
            with timings.step("compose: podman-compose down -v"):
                stack.compose("down", "-v", "-t", str(stack.grace), timeout=600, check=False)
                stack.remove_everything()


# --- the whole check ----------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m imagecheck", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--fresh", action="store_true", help="build the stand-in images again")
    args = parser.parse_args()
    started = time.monotonic()
    timings = Timings()
    try:
        with timings.step("prerequisites: packages, host Postgres and Redis"):
            prerequisites()
        standins(timings, args.fresh)
        build_relay(timings)
        check_roles(timings)
        check_compose(timings)
    except CheckFailed as failure:
        timings.report(started)
        print(f"\nimage check FAILED: {failure}", file=sys.stderr)
        return 1
    timings.report(started)
    print(f"\n{RELAY_IMAGE}: {image_mb(RELAY_IMAGE):.0f} MB (podman image inspect)")
    for standin in STANDINS:
        print(f"{standin.name} (stand-in {standin.image}): {image_mb(standin.image):.0f} MB")
    print("\nimage check passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
