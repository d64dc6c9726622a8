"""The database tables. The schema itself is created by the Alembic migrations.

Rules the database guarantees rather than the code: a GPU has at most one active
allocation (unique partial index `uq_allocations_active_gpu`), a token hash is unique.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

ACTIVE = "active"
RELEASED = "released"
EXPIRED = "expired"
REVOKED = "revoked"
STATES = (ACTIVE, RELEASED, EXPIRED, REVOKED)  # the one list of allocation states
# Queued requests (SPEC section 11).
WAITING = "waiting"
GRANTED = "granted"
CANCELLED = "cancelled"
REQUEST_STATES = (WAITING, GRANTED, CANCELLED, EXPIRED)
# Reservations.
BOOKED = "booked"
STARTED = "started"
FAILED = "failed"
RESERVATION_STATES = (BOOKED, STARTED, CANCELLED, FAILED)


def utcnow() -> datetime:
    """The current time, timezone-aware UTC (time_machine moves it in tests)."""
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Stores naive UTC, returns aware UTC, on SQLite and PostgreSQL alike."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the database; use models.utcnow()")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC)


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UTCDateTime, dict[str, Any]: JSON}


class Gpu(Base):
    """One GPU of one host, as its agent last reported it (the inventory)."""

    __tablename__ = "gpus"
    __table_args__ = (UniqueConstraint("host", "gpu_id", name="uq_gpus_host_gpu"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    host: Mapped[str] = mapped_column(String(255))
    gpu_id: Mapped[int] = mapped_column(Integer)
    gpu_type: Mapped[str] = mapped_column(String(64), index=True)
    name: Mapped[str] = mapped_column(String(255), default="")
    uuid: Mapped[str | None] = mapped_column(String(128), nullable=True)
    pci_bus_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    minor: Mapped[int] = mapped_column(Integer)
    device: Mapped[str] = mapped_column(String(1024))
    memory_total_mib: Mapped[int] = mapped_column(Integer, default=0)
    mig: Mapped[bool] = mapped_column(Boolean, default=False)
    healthy: Mapped[bool] = mapped_column(Boolean, default=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    seen_at: Mapped[datetime] = mapped_column(UTCDateTime)


class Allocation(Base):
    """One GPU held by one user for a time."""

    __tablename__ = "allocations"
    __table_args__ = (
        Index(
            "uq_allocations_active_gpu",
            "host",
            "gpu_id",
            unique=True,
            sqlite_where=text("state = 'active'"),
            postgresql_where=text("state = 'active'"),
        ),
        Index("ix_allocations_user_state", "user", "state"),
        Index("ix_allocations_state_expires", "state", "expires_at"),
        Index("ix_allocations_host_removed", "host", "access_removed_at"),  # agent's pending work
        Index("ix_allocations_released", "released_at"),  # fair share: what ended since
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user: Mapped[str] = mapped_column(String(255))
    host: Mapped[str] = mapped_column(String(255))
    gpu_id: Mapped[int] = mapped_column(Integer)
    gpu_type: Mapped[str] = mapped_column(String(64))
    device: Mapped[str] = mapped_column(String(1024))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
    released_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    release_reason: Mapped[str | None] = mapped_column(String(64), nullable=True)
    released_by: Mapped[str | None] = mapped_column(String(255), nullable=True)
    state: Mapped[str] = mapped_column(String(16), default=ACTIVE)
    access_applied_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    access_removed_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    reminded_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    expiry_warned_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    idle_warned_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)

    def to_dict(self) -> dict[str, Any]:
        """The public shape of an allocation (API, CLI --json)."""
        return {
            "id": self.id,
            "user": self.user,
            "host": self.host,
            "gpu_id": self.gpu_id,
            "gpu_type": self.gpu_type,
            "device": self.device,
            "state": self.state,
            "created_at": iso(self.created_at),
            "expires_at": iso(self.expires_at),
            "released_at": iso(self.released_at),
            "release_reason": self.release_reason,
            "access_applied_at": iso(self.access_applied_at),
        }


class Event(Base):
    """The audit log: who did what, when, why. Rows are never updated or deleted."""

    __tablename__ = "events"
    __table_args__ = (
        Index("ix_events_at", "at"),
        Index("ix_events_user_at", "user", "at"),
        Index("ix_events_kind_at", "kind", "at"),
    )

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime)
    kind: Mapped[str] = mapped_column(String(64))
    actor: Mapped[str] = mapped_column(String(255))
    user: Mapped[str | None] = mapped_column(String(255), nullable=True)
    host: Mapped[str | None] = mapped_column(String(255), nullable=True)
    gpu_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    allocation_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    message: Mapped[str] = mapped_column(Text, default="")
    data: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)

    def to_dict(self) -> dict[str, Any]:
        """The public shape of an event."""
        return {
            "id": self.id,
            "at": iso(self.at),
            "kind": self.kind,
            "actor": self.actor,
            "user": self.user,
            "host": self.host,
            "gpu_id": self.gpu_id,
            "allocation_id": self.allocation_id,
            "message": self.message,
            "data": self.data or {},
        }


class Lockout(Base):
    """A user who may not allocate until `until` (after a violation), unless lifted."""

    __tablename__ = "lockouts"
    __table_args__ = (Index("ix_lockouts_user_until", "user", "until"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    until: Mapped[datetime] = mapped_column(UTCDateTime)
    reason: Mapped[str] = mapped_column(Text, default="")
    created_by: Mapped[str] = mapped_column(String(255), default="system")
    lifted_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    lifted_by: Mapped[str | None] = mapped_column(String(255), nullable=True)

    def to_dict(self) -> dict[str, Any]:
        """The public shape of a lockout."""
        return {
            "id": self.id,
            "user": self.user,
            "created_at": iso(self.created_at),
            "until": iso(self.until),
            "reason": self.reason,
            "lifted_at": iso(self.lifted_at),
        }


class Setting(Base):
    """Runtime switches an admin can flip (maintenance mode)."""

    __tablename__ = "settings"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[dict[str, Any]] = mapped_column(JSON)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_by: Mapped[str] = mapped_column(String(255))


class Notification(Base):
    """One message in one user's in-app inbox."""

    __tablename__ = "notifications"
    __table_args__ = (Index("ix_notifications_user_read", "user", "read_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user: Mapped[str] = mapped_column(String(255))
    kind: Mapped[str] = mapped_column(String(64))
    message: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    read_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)

    def to_dict(self) -> dict[str, Any]:
        """The public shape of a notification."""
        return {
            "id": self.id,
            "kind": self.kind,
            "message": self.message,
            "created_at": iso(self.created_at),
            "read_at": iso(self.read_at),
        }


class OutboxMessage(Base):
    """A message waiting to go out on one channel; retried with backoff until sent."""

    __tablename__ = "outbox"
    __table_args__ = (Index("ix_outbox_pending", "sent_at", "next_attempt_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    channel: Mapped[str] = mapped_column(String(32))
    target: Mapped[str] = mapped_column(Text)
    kind: Mapped[str] = mapped_column(String(64))
    message: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    # Set when the channel refused the message for good (e.g. an unknown chat): not retried.
    failed_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)


class UserProfile(Base):
    """Per-user settings: the linked Telegram chat."""

    __tablename__ = "user_profiles"

    user: Mapped[str] = mapped_column(String(255), primary_key=True)
    telegram_chat_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    telegram_link_code: Mapped[str | None] = mapped_column(String(64), nullable=True, unique=True)
    telegram_linked_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class ApiToken(Base):
    """A bearer token for the API; only its SHA-256 is stored."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user: Mapped[str] = mapped_column(String(255), index=True)
    name: Mapped[str] = mapped_column(String(255), default="")
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    kind: Mapped[str] = mapped_column(String(16), default="api")  # "api" or "web" (a sign-in)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class LoginFailure(Base):
    """A failed sign-in, by user name and by client address (throttling without Redis)."""

    __tablename__ = "login_failures"
    __table_args__ = (Index("ix_login_failures_key_at", "key", "at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key: Mapped[str] = mapped_column(String(300))
    at: Mapped[datetime] = mapped_column(UTCDateTime)


class GpuSample(Base):
    """History: one GPU's utilization and memory at one time (every GPU_ACTIVITY_CHECK_MINUTES)."""

    __tablename__ = "gpu_samples"
    # The values are in the index too, so charts and the idle policy read it alone
    # (an index-only scan: a GPU's rows are spread over the whole table).
    __table_args__ = (
        Index("ix_gpu_samples_gpu_at", "host", "gpu_id", "at", "utilization", "memory_used_mib"),
    )

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    host: Mapped[str] = mapped_column(String(255))
    gpu_id: Mapped[int] = mapped_column(Integer)
    at: Mapped[datetime] = mapped_column(UTCDateTime)
    utilization: Mapped[float] = mapped_column(Float)
    memory_used_mib: Mapped[float] = mapped_column(Float)
    holder: Mapped[str | None] = mapped_column(String(255), nullable=True)
    processes: Mapped[int] = mapped_column(Integer, default=0)


class LiveStatus(Base):
    """The latest live sample of each GPU, for web workers when there is no Redis."""

    __tablename__ = "live_status"

    host: Mapped[str] = mapped_column(String(255), primary_key=True)
    gpu_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime)
    data: Mapped[dict[str, Any]] = mapped_column(JSON)


class Heartbeat(Base):
    """Liveness of a long-running process (`agent:<host>`), and what it last reported."""

    __tablename__ = "heartbeats"

    name: Mapped[str] = mapped_column(String(255), primary_key=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime)
    data: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)


class Lease(Base):
    """A named lease (e.g. which process runs the policies); expires if its holder dies."""

    __tablename__ = "leases"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    holder: Mapped[str] = mapped_column(String(255))
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)


class DiskUsage(Base):
    """A user's measured home-directory size and its filesystem's totals (the cache)."""

    __tablename__ = "disk_usage"

    user: Mapped[str] = mapped_column(String(255), primary_key=True)
    home: Mapped[str] = mapped_column(String(1024))
    used_bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    scanned_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    fs_total_bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    fs_used_bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    fs_free_bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    status: Mapped[str] = mapped_column(String(16), default="pending")
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    measured_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


def iso(value: datetime | None) -> str | None:
    """ISO 8601, or None."""
    return value.isoformat() if value is not None else None
