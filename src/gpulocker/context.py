"""What every entry point (CLI, web, agent) needs: settings, the database, Redis."""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING

from gpulocker import safefs
from gpulocker.config import ConfigError, Settings
from gpulocker.db import Database

if TYPE_CHECKING:
    from redis import Redis

log = logging.getLogger(__name__)
# What STATE_DIR holds that others must not read: the database (Telegram link codes,
# NOTIFY_URLS credentials), its WAL and SHM, and the generated secret key.
STATE_FILES = ("gpulocker.db", "gpulocker.db-wal", "gpulocker.db-shm", "secret_key")


@dataclass
class Context:
    """Settings plus the connections made from them, opened once per process."""

    settings: Settings
    db: Database = field(init=False)

    def __post_init__(self) -> None:
        self.db = Database(self.settings.database_url)

    @cached_property
    def redis(self) -> Redis | None:
        """The Redis client when REDIS_URL / REDIS_HOST is set, else None."""
        url = self.settings.effective_redis_url
        if not url:
            return None
        from redis import Redis

        return Redis.from_url(
            url, socket_timeout=5, socket_connect_timeout=5, health_check_interval=30
        )

    def close(self) -> None:
        """Close the connections."""
        self.db.dispose()
        if "redis" in self.__dict__ and self.redis is not None:
            self.redis.close()


def open_context(settings: Settings, migrate: bool = True) -> Context:
    """A Context with the schema brought up to date (migrations run at every start)."""
    try:  # outside systemd too, nobody else reads the state (SPEC §12)
        if os.path.isdir(settings.state_dir):
            safefs.private_state(settings.state_dir, STATE_FILES)
    except safefs.UnsafePath as exc:
        log.warning("STATE_DIR: %s", exc)
    ctx = Context(settings)
    if migrate:
        ctx.db.upgrade()
    return ctx


def configure_logging(settings: Settings, stream: bool = True) -> None:
    """LOG_LEVEL for everything; LOG_FILE as well as stderr when set."""
    root = logging.getLogger()
    root.setLevel(settings.log_level)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(process)d] %(message)s")
    for handler in list(root.handlers):
        if getattr(handler, "_gpulocker", False):
            root.removeHandler(handler)
    handlers: list[logging.Handler] = []
    if stream:
        handlers.append(logging.StreamHandler(sys.stderr))
    if settings.log_file:
        try:
            os.close(safefs.open_nofollow(settings.log_file, os.O_WRONLY | os.O_CREAT, 0o600))
            safefs.make_private(settings.log_file)
            handlers.append(
                logging.handlers.WatchedFileHandler(settings.log_file, encoding="utf-8")
            )
        except OSError as exc:
            raise ConfigError(
                f"LOG_FILE: expected a file GPULocker can write, got {settings.log_file!r} "
                f"({exc.strerror})"
            ) from None
    for handler in handlers:
        handler.setFormatter(fmt)
        handler._gpulocker = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    logging.getLogger("alembic").setLevel(max(logging.WARNING, root.level))
