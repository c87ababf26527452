"""Shared test set-up.

CPUSHARE_TEST_SECCOMP_FILTER=permissive runs the whole session under a
seccomp filter that allows everything (python3-seccomp), the way systemd's
hardening or a container does: the kernel then refuses SECCOMP_MODE_STRICT
and the sandbox must stack its own filter.
"""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SRC = os.path.join(ROOT, "src")
if SRC not in sys.path:
    sys.path.insert(0, SRC)


def pytest_configure(config):
    if os.environ.get("CPUSHARE_TEST_SECCOMP_FILTER") == "permissive":
        import seccomp

        seccomp.SyscallFilter(seccomp.ALLOW).load()


def _proc_seccomp() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("Seccomp:"):
                return int(line.split()[1])
    raise RuntimeError("/proc/self/status has no Seccomp: line")


@pytest.fixture(scope="session")
def expected_mode() -> str:
    """The seccomp mode jobs of this session must use, from /proc, not from
    the code under test."""
    return "strict" if _proc_seccomp() == 0 else "filter"


@pytest.fixture(scope="session")
def root_dir() -> str:
    return ROOT


@pytest.fixture(scope="session")
def pg_cluster():
    """A throwaway PostgreSQL cluster for the session (tests/pgcluster.py),
    stopped and removed at its end; skipped only where the machine has no
    PostgreSQL server or psycopg."""
    import pgcluster
    why = pgcluster.missing()
    if why:
        pytest.skip(why)
    cluster = pgcluster.PgCluster.start()
    yield cluster
    cluster.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def market_db(request):
    """The database of a test's market: None (a SQLite file in its directory)
    or a new PostgreSQL database's URL; a test that takes it runs on both."""
    if request.param == "sqlite":
        return None
    return request.getfixturevalue("pg_cluster").database()
