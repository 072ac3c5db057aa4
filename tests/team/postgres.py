"""A throw-away PostgreSQL server for the team-scale tests: a temporary data directory, a private socket,
torn down after. ``pgserver`` (the dev extra; it ships the binaries and runs as root too) is preferred;
``initdb``/``pg_ctl`` on PATH are the fallback."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from pathlib import Path


class PostgresServer:
    def __init__(self, root: Path) -> None:
        self.root = root
        self._pgserver = None
        try:
            import pgserver
        except ImportError:
            self._start_from_path()
        else:
            self._pgserver = pgserver.get_server(root / "data", cleanup_mode="stop")
            self.socket_dir = str(root / "data")

    def _start_from_path(self) -> None:
        if shutil.which("initdb") is None or shutil.which("pg_ctl") is None:
            raise RuntimeError("no PostgreSQL: install the dev extras (pgserver) or put initdb/pg_ctl on PATH")
        if os.geteuid() == 0:
            raise RuntimeError("initdb refuses to run as root: install the dev extras (pgserver)")
        data, self.socket_dir = self.root / "data", str(self.root)
        subprocess.run(["initdb", "-D", str(data), "-U", "postgres", "--auth=trust"], check=True, capture_output=True)
        subprocess.run(
            ["pg_ctl", "-D", str(data), "-w", "-l", str(self.root / "log"), "-o",
             f"-k {self.socket_dir} -c listen_addresses=''", "start"],
            check=True, capture_output=True,
        )  # fmt: skip
        self._data = data

    def psql(self, sql: str) -> None:
        if self._pgserver is not None:
            self._pgserver.psql(sql)
            return
        subprocess.run(["psql", "-h", self.socket_dir, "-U", "postgres", "-c", sql], check=True, capture_output=True)

    def create_database(self) -> str:
        """A fresh database; its SQLAlchemy URL (psycopg 3 driver, over the server's socket)."""
        name = "t" + uuid.uuid4().hex[:12]
        self.psql(f"CREATE DATABASE {name};")
        return f"postgresql+psycopg://postgres@/{name}?host={self.socket_dir}"

    def restart(self) -> None:
        """Stop in fast mode (every open connection is cut, as in a crash or a failover) and start again."""
        if self._pgserver is not None:
            from pgserver import _commands

            server = self._pgserver
            _commands.pg_ctl(["-w", "-m", "fast", "-l", str(server.log), "restart"], pgdata=server.pgdata,
                             user=server.system_user, timeout=60)  # fmt: skip
        else:
            subprocess.run(
                ["pg_ctl", "-D", str(self._data), "-w", "-m", "fast", "-l", str(self.root / "log"), "restart"],
                check=True, capture_output=True,
            )  # fmt: skip

    def stop(self) -> None:
        if self._pgserver is not None:
            server = self._pgserver
            server.cleanup()
            if (Path(server.pgdata) / "postmaster.pid").exists():  # restarted by pg_ctl: pgserver lost track of it
                from pgserver import _commands

                _commands.pg_ctl(["-w", "-m", "fast", "stop"], pgdata=server.pgdata, user=server.system_user,
                                 timeout=60)  # fmt: skip
        else:
            subprocess.run(["pg_ctl", "-D", str(self._data), "-m", "fast", "stop"], capture_output=True)
