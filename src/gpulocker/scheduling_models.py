"""The scheduling tables (SPEC section 11): queued requests and reservations.

They join `models.Base.metadata`; the migrations' env imports this module for that.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Float, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from gpulocker.models import BOOKED, WAITING, Base, UTCDateTime, iso


class QueuedRequest(Base):
    """A request waiting for GPUs; granted all or nothing, once (SPEC section 11)."""

    __tablename__ = "queued_requests"
    __table_args__ = (
        Index("ix_queued_requests_state_created", "state", "created_at"),
        Index("ix_queued_requests_user_state", "user", "state"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user: Mapped[str] = mapped_column(String(255))
    requested_by: Mapped[str] = mapped_column(String(255))
    gpu_type: Mapped[str] = mapped_column(String(64))
    count: Mapped[int] = mapped_column(Integer)
    hours: Mapped[float] = mapped_column(Float)
    state: Mapped[str] = mapped_column(String(16), default=WAITING)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    wait_until: Mapped[datetime] = mapped_column(UTCDateTime)
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    host: Mapped[str | None] = mapped_column(String(255), nullable=True)
    allocation_ids: Mapped[list[int] | None] = mapped_column(JSON, nullable=True)

    def to_dict(self, position: int | None = None) -> dict[str, Any]:
        """The public shape of a queued request."""
        return {
            "id": self.id,
            "user": self.user,
            "gpu_type": self.gpu_type,
            "count": self.count,
            "hours": self.hours,
            "state": self.state,
            "position": position,
            "created_at": iso(self.created_at),
            "wait_until": iso(self.wait_until),
            "ended_at": iso(self.ended_at),
            "reason": self.reason,
            "host": self.host,
            "allocation_ids": self.allocation_ids or [],
        }


class Reservation(Base):
    """GPUs of a type promised on one host for a future window (booked ahead)."""

    __tablename__ = "reservations"
    __table_args__ = (
        Index("ix_reservations_state_start", "state", "start_at"),
        Index("ix_reservations_user_state", "user", "state"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user: Mapped[str] = mapped_column(String(255))
    booked_by: Mapped[str] = mapped_column(String(255))
    gpu_type: Mapped[str] = mapped_column(String(64))
    count: Mapped[int] = mapped_column(Integer)
    host: Mapped[str] = mapped_column(String(255))
    start_at: Mapped[datetime] = mapped_column(UTCDateTime)
    end_at: Mapped[datetime] = mapped_column(UTCDateTime)
    state: Mapped[str] = mapped_column(String(16), default=BOOKED)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    reminded_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    allocation_ids: Mapped[list[int] | None] = mapped_column(JSON, nullable=True)

    def to_dict(self) -> dict[str, Any]:
        """The public shape of a reservation."""
        return {
            "id": self.id,
            "user": self.user,
            "gpu_type": self.gpu_type,
            "count": self.count,
            "host": self.host,
            "start": iso(self.start_at),
            "end": iso(self.end_at),
            "hours": (self.end_at - self.start_at).total_seconds() / 3600,
            "state": self.state,
            "created_at": iso(self.created_at),
            "reason": self.reason,
            "allocation_ids": self.allocation_ids or [],
        }
