"""A throwaway PostgreSQL cluster for the tests: Debian's server binaries
(/usr/lib/postgresql/VERSION/bin), initdb and pg_ctl run as the
unprivileged `postgres` user (the server refuses root) in a temporary
directory, listening on a unix socket there only (no TCP port to collide
with), trust authentication; `stop()` stops it and removes the directory.

    pg = PgCluster.start()
    url = pg.database("t1")      # a new, empty database: postgresql://...
    pg.stop()

pg_stat_statements is loaded (bench/ counts statements per task with it).
`missing()` says why it cannot run here (no server installed, no postgres
user, no psycopg).
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile

USER = "postgres"
_names = itertools.count(1)


def _bindir() -> str | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0)
    return os.path.dirname(found[-1]) if found else None


def missing() -> str | None:
    if _bindir() is None:
        return "PostgreSQL's server is not installed (Debian: postgresql)"
    try:
        pwd.getpwnam(USER)
    except KeyError:
        return f"no {USER} user (Debian's postgresql package makes it)"
    if os.geteuid() != 0:
        return "starting a PostgreSQL cluster as the postgres user needs root here"
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg 3 is not installed (Debian: python3-psycopg)"
    return None


class PgCluster:
    def __init__(self, root: str, bindir: str):
        self.root = root
        self.bindir = bindir
        self.data = os.path.join(root, "data")
        self.socket_dir = root
        self.port = 5432

    @classmethod
    def start(cls) -> "PgCluster":
        why = missing()
        if why:
            raise RuntimeError(why)
        pw = pwd.getpwnam(USER)
        root = tempfile.mkdtemp(prefix="cpushare-pg-")
        os.chown(root, pw.pw_uid, pw.pw_gid)
        pg = cls(root, _bindir())
        try:
            pg._as_postgres([os.path.join(pg.bindir, "initdb"), "-D", pg.data, "-A", "trust",
                             "-U", USER, "-E", "UTF8", "--no-sync"], timeout=120)
            opts = (f"-c listen_addresses='' -k {root} -p {pg.port} -c fsync=off "
                    f"-c max_connections=200 -c shared_buffers=64MB "
                    f"-c shared_preload_libraries=pg_stat_statements")
            pg._as_postgres([os.path.join(pg.bindir, "pg_ctl"), "-D", pg.data, "-w", "-t", "60",
                             "-l", os.path.join(root, "server.log"), "-o", opts, "start"],
                            timeout=90)
        except BaseException:
            pg.stop()
            raise
        return pg

    def _as_postgres(self, argv: list[str], timeout: float) -> subprocess.CompletedProcess:
        r = subprocess.run(["runuser", "-u", USER, "--", *argv], capture_output=True, text=True,
                           timeout=timeout, cwd=self.root)
        if r.returncode:
            raise RuntimeError(f"{' '.join(argv[:2])}: exit {r.returncode}: "
                               f"{r.stderr.strip() or r.stdout.strip()}\n{self.log()[-2000:]}")
        return r

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://{USER}@/{dbname}?host={self.socket_dir}&port={self.port}"

    def database(self, prefix: str = "t") -> str:
        """A new empty database's URL."""
        import psycopg
        name = f"{prefix}{os.getpid()}_{next(_names)}"
        with psycopg.connect(self.url(), autocommit=True) as c:
            c.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def log(self) -> str:
        try:
            with open(os.path.join(self.root, "server.log"), errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def stop(self) -> None:
        if os.path.exists(os.path.join(self.data, "postmaster.pid")):
            subprocess.run(["runuser", "-u", USER, "--", os.path.join(self.bindir, "pg_ctl"),
                            "-D", self.data, "-m", "immediate", "-w", "stop"],
                           capture_output=True, timeout=60)
        shutil.rmtree(self.root, ignore_errors=True)
