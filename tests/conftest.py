"""Fixtures for every test: fresh databases (SQLite and PostgreSQL), a flushed Redis,
real Linux test users, a test PAM service, and a device directory others can reach."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import psycopg
import pytest

from gpulocker.config import Settings
from gpulocker.context import Context
from gpulocker.db import Database, upgrade
from gpulocker.gpus.simulated import SimulatedBackend
from gpulocker.inventory import register, types_from_config
from tests.fake_pynvml import machines
from tests.helpers import ADMIN, ALICE, ALL_USERS, IS_ROOT, RUN, TestUser, password_for

POSTGRES_URL = os.environ.get("TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


def _redis_db() -> int:
    """A Redis database number (1-15) per run, and per worker under pytest-xdist: a run's
    workers never flush each other's, and parallel runs rarely do."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if not worker.startswith("gw"):
        return 1 + int(RUN) % 15
    base = int(uuid.UUID(os.environ["PYTEST_XDIST_TESTRUNUID"]).int % 15)
    return 1 + (base + int(worker[2:])) % 15


REDIS_URL = os.environ.get("TEST_REDIS_URL", f"redis://127.0.0.1:6379/{_redis_db()}")
DATABASES = os.environ.get("GPULOCKER_TEST_DATABASES", "sqlite,postgresql").split(",")
PAM_SERVICE = f"gpulocker-test-{RUN}"
TEMPLATE = f"gltest_template_{RUN}"
GPU_CONFIG = {"4090": [0, 1, 2, 3], "a100": [4, 5]}
TEST_HOST = "testhost"

needs_root = pytest.mark.skipif(not IS_ROOT, reason="needs root: real users, PAM and ACLs")


def _admin_conn() -> psycopg.Connection:
    return psycopg.connect(
        POSTGRES_URL.replace("postgresql+psycopg://", "postgresql://"), autocommit=True
    )


def _pg_url(name: str) -> str:
    return POSTGRES_URL.rsplit("/", 1)[0] + "/" + name


class _PostgresPool:
    """Fresh PostgreSQL databases copied from the migrated template, made one ahead and
    dropped in the background: a test waits for neither CREATE nor DROP DATABASE (each
    about 0.1-0.2 s, paid by every PostgreSQL test otherwise)."""

    def __init__(self, template: str) -> None:
        self.template = template
        self.pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="pg-pool")
        self.next: Future[str] = self.pool.submit(self._create)
        self.drops: list[Future[None]] = []

    def _create(self) -> str:
        name = f"gltest_{uuid.uuid4().hex[:12]}"
        with _admin_conn() as conn:
            conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{self.template}"')
        return name

    def _drop(self, name: str) -> None:
        with _admin_conn() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def take(self) -> str:
        name = self.next.result()
        self.next = self.pool.submit(self._create)
        return name

    def give_back(self, name: str) -> None:
        self.drops.append(self.pool.submit(self._drop, name))

    def close(self) -> None:
        self.give_back(self.next.result())
        for drop in self.drops:
            drop.result()
        self.pool.shutdown()


@pytest.fixture(scope="session")
def pg_template() -> Iterator[str]:
    """A migrated PostgreSQL database that each test's database is copied from (fast)."""
    with _admin_conn() as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{TEMPLATE}"')
        conn.execute(f'CREATE DATABASE "{TEMPLATE}"')
    database = Database(_pg_url(TEMPLATE))
    upgrade(database.engine)
    database.dispose()
    yield TEMPLATE
    with _admin_conn() as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{TEMPLATE}" WITH (FORCE)')


@pytest.fixture(scope="session")
def pg_pool(pg_template: str) -> Iterator[_PostgresPool]:
    """Where each PostgreSQL test's fresh database comes from."""
    pool = _PostgresPool(pg_template)
    yield pool
    pool.close()


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated SQLite file that each test's database is copied from (no migrations per test)."""
    path = tmp_path_factory.mktemp("sqlite-template") / "gpulocker.db"
    database = Database(f"sqlite:///{path}")
    upgrade(database.engine)
    database.dispose()
    return path


@pytest.fixture(params=DATABASES)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, migrated database for one test: SQLite and PostgreSQL (parametrized)."""
    if request.param == "sqlite":
        path = tmp_path / "gpulocker.db"
        shutil.copy2(request.getfixturevalue("sqlite_template"), path)  # its mode too
        yield f"sqlite:///{path}"
        return
    pool: _PostgresPool = request.getfixturevalue("pg_pool")
    name = pool.take()
    yield _pg_url(name)
    pool.give_back(name)


@pytest.fixture
def device_dir() -> Iterator[Path]:
    """A directory for simulated device files that every test user can reach (0755 path)."""
    base = Path(tempfile.mkdtemp(prefix="gpulocker-test-", dir="/tmp"))
    base.chmod(0o755)
    dev = base / "dev"
    dev.mkdir(mode=0o755)
    yield dev
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def settings(tmp_path: Path, database_url: str, device_dir: Path) -> Settings:
    """Settings for one test: simulated GPUs {"4090": [0-3], "a100": [4, 5]}, fresh database."""
    return Settings(
        state_dir=tmp_path / "state",
        database_url=database_url,
        gpu_backend="simulated",
        gpu_config=GPU_CONFIG,
        device_dir=device_dir,
        gpu_host=TEST_HOST,
        privileged_users=(ADMIN,),
        pam_service=PAM_SERVICE,
        secret_key="test-secret-key",
        kill_grace_seconds=1.0,
        reconcile_seconds=0.5,
        login_failure_floor_seconds=0,  # failed sign-ins are not padded, to keep tests fast
        socket_path=device_dir.parent / "gl.sock",  # never the system's /run/gpulocker
    )


@pytest.fixture
def db(settings: Settings) -> Iterator[Database]:
    """The test's database, with the simulated GPUs of `settings` registered."""
    database = Database(settings.database_url)
    backend = SimulatedBackend(settings.gpu_config, settings.device_path, settings.gpu_host)
    with database.transaction() as session:
        register(
            session, settings.gpu_host, types_from_config(settings.gpu_config, backend.inventory())
        )
    yield database
    database.dispose()


@pytest.fixture
def ctx(settings: Settings, db: Database) -> Iterator[Context]:
    """A Context on the test's settings and database."""
    context = Context(settings)
    yield context
    context.close()


@pytest.fixture
def redis_client() -> Iterator[object]:
    """A Redis database flushed before and after the test."""
    from redis import Redis

    client = Redis.from_url(REDIS_URL)
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


def _delete_user(name: str) -> None:
    subprocess.run(["pkill", "-KILL", "-u", name], check=False, capture_output=True)
    subprocess.run(["userdel", "-r", "-f", name], check=False, capture_output=True)


@pytest.fixture(scope="session")
def users() -> Iterator[dict[str, TestUser]]:
    """Real Linux accounts alice, bob, carol and admin, with passwords; removed afterwards."""
    if not IS_ROOT:
        pytest.skip("needs root to create test users")
    made: dict[str, TestUser] = {}
    try:
        for name in ALL_USERS:
            _delete_user(name)
            subprocess.run(
                ["useradd", "-m", "-s", "/bin/bash", name], check=True, capture_output=True
            )
            subprocess.run(
                ["chpasswd"],
                input=f"{name}:{password_for(name)}\n",
                text=True,
                check=True,
                capture_output=True,
            )
            entry = pwd.getpwnam(name)
            made[name] = TestUser(
                name, password_for(name), entry.pw_uid, entry.pw_gid, entry.pw_dir
            )
        yield made
    finally:
        for name in ALL_USERS:
            _delete_user(name)


@pytest.fixture(scope="session")
def pam_service() -> Iterator[str]:
    """A PAM service checking /etc/shadow with `nodelay`, so failed sign-ins are fast."""
    if not IS_ROOT:
        pytest.skip("needs root to install a PAM service")
    path = Path("/etc/pam.d") / PAM_SERVICE
    path.write_text(
        "# GPULocker tests: pam_unix without the failure delay\n"
        "auth     required pam_unix.so nodelay\n"
        "account  required pam_unix.so\n"
    )
    yield PAM_SERVICE
    path.unlink(missing_ok=True)


# --- the captured `lab` machine of the GPU backend tests (nvml and smi alike) ------------

GONE_PID = 4_999_999  # above the kernel's largest pid: never a live process


@pytest.fixture
def alice_process(users: dict[str, TestUser]) -> Iterator[subprocess.Popen[bytes]]:
    """A real process owned by alice, standing for her training job on a GPU."""
    alice = users[ALICE]
    proc = subprocess.Popen(["sleep", "120"], user=alice.uid, group=alice.gid, extra_groups=[])
    yield proc
    proc.kill()
    proc.wait()


@pytest.fixture
def lab_pids(alice_process: subprocess.Popen[bytes]) -> dict[int, int]:
    """The captured pids of the `lab` machine mapped to live ones (and one that is gone)."""
    return {
        machines.LAB_PIDS["alice"]: alice_process.pid,
        machines.LAB_PIDS["mig"]: os.getpid(),
        machines.LAB_PIDS["gone"]: GONE_PID,
    }
