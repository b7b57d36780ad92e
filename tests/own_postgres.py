"""A PostgreSQL cluster of its own (initdb on a free port), for tests that restart their
database and for benchmarks that need server settings the machine's shared cluster lacks."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path


def _postgres_bindir() -> Path:
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: [int(x) for x in Path(p).parent.parent.name.split(".") if x.isdigit()],
    )
    if not candidates:
        found = shutil.which("initdb")
        if found is None:
            raise AssertionError("no initdb under /usr/lib/postgresql/*/bin nor on PATH")
        return Path(found).parent
    return Path(candidates[-1]).parent


class OwnPostgres:
    """A PostgreSQL cluster made with initdb (trust auth, user postgres).

    The server binaries refuse to run as root, so as root they run as the `postgres` user.
    """

    def __init__(self, base: Path, port: int, listen: str = "127.0.0.1") -> None:
        self.base = base
        self.data = base / "data"
        self.port = port
        self.listen = listen
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
        self.log_path = self.data / "server.log"
        self._bindir = _postgres_bindir()
        self._as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []

    def _run(self, *args: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
        binary = str(self._bindir / args[0])
        done = subprocess.run(
            [*self._as_postgres, binary, *args[1:]],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            cwd=self.base,
        )
        if done.returncode != 0:
            raise AssertionError(
                f"{args[0]} {' '.join(args[1:])} failed ({done.returncode}):\n"
                f"{done.stdout}\n{done.stderr}\n{self.log_tail()}"
            )
        return done

    def initdb(self) -> None:
        self.data.mkdir(mode=0o700)
        if self._as_postgres:
            shutil.chown(self.data, "postgres", "postgres")
        self._run(
            "initdb", "-D", str(self.data), "--auth=trust", "-U", "postgres",
            "-E", "UTF8", "--no-sync", "--no-instructions",
        )  # fmt: skip

    def trust(self, cidr: str) -> None:
        """Let clients from `cidr` in without a password (before start)."""
        with (self.data / "pg_hba.conf").open("a") as hba:
            hba.write(f"host all all {cidr} trust\n")

    def start(self, settings: Mapping[str, str] | None = None) -> None:
        """Start the server; `settings` are server parameters (`-c name=value`)."""
        options = f"-p {self.port} -k {self.data} -c listen_addresses={self.listen}"
        options += "".join(f" -c {name}={value}" for name, value in (settings or {}).items())
        self._run(
            "pg_ctl", "-D", str(self.data), "-l", str(self.log_path), "-o", options,
            "-w", "-t", "60", "start",
        )  # fmt: skip

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def restart(self) -> None:
        # Not `pg_ctl restart`: it forgets -l, and the server would then hold our pipes open.
        self.stop()
        self.start()

    @property
    def postmaster_pid(self) -> int:
        return int((self.data / "postmaster.pid").read_text().split()[0])

    @property
    def running(self) -> bool:
        done = subprocess.run(
            [*self._as_postgres, str(self._bindir / "pg_ctl"), "-D", str(self.data), "status"],
            capture_output=True,
            cwd=self.base,
        )
        return done.returncode == 0

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


@contextlib.contextmanager
def started_cluster(
    port: int,
    *,
    listen: str = "127.0.0.1",
    trust: Sequence[str] = (),
    settings: Mapping[str, str] | None = None,
) -> Iterator[OwnPostgres]:
    """A new cluster, started with server parameters `settings` and letting clients from the
    `trust` networks in; stopped and its files removed afterwards. It lives under /tmp, not
    a test's tmp_path: the postgres user must be able to reach it."""
    base = Path(tempfile.mkdtemp(prefix="rerank-pg-", dir="/tmp"))
    base.chmod(0o755)
    server = OwnPostgres(base, port, listen=listen)
    try:
        server.initdb()
        for cidr in trust:
            server.trust(cidr)
        server.start(settings)
        yield server
    finally:
        if server.data.exists() and server.running:
            server.stop(mode="immediate")
        shutil.rmtree(base, ignore_errors=True)
