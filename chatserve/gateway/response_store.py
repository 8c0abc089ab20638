"""Stored responses (`store: true`, the Responses API's default): what `previous_response_id` continues
from, and what `GET`/`DELETE /v1/responses/{id}` and `.../input_items` read.

One row per response: the response object as answered, the input items it was given, and the
conversation it closes (the earlier turns, its input and its output as chat messages), so a continuation
is rendered from the same messages each turn and the worker's prefix cache serves the history. Rows carry
their owner (a hash of the API key, or of the client's address without keys): another key's response is
not found. Any gateway on the same database (SQLite file by default, or a SQLAlchemy URL) finds every
response, across restarts. SQLAlchemy in a worker thread: the event loop never waits on the database.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import JSON, Float, String, Text, delete, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from chatserve.db import database_url, open_engine


class Base(DeclarativeBase):
    pass


class StoredResponseRow(Base):
    __tablename__ = "responses"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    owner: Mapped[str] = mapped_column(String(64), index=True)
    created_at: Mapped[float] = mapped_column(Float)
    model: Mapped[str] = mapped_column(Text)
    response: Mapped[dict[str, Any]] = mapped_column(JSON)
    input_items: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    conversation: Mapped[list[dict[str, Any]]] = mapped_column(JSON)


@dataclass(slots=True)
class StoredResponse:
    response: dict[str, Any]
    input_items: list[dict[str, Any]]
    conversation: list[dict[str, Any]]  # chat messages (ChatMessage dumps), without the instructions


def owner_of(caller: str) -> str:
    return hashlib.sha256(caller.encode()).hexdigest()


class ResponseStore:
    def __init__(self, target: str):
        self.engine = open_engine(database_url(target))
        Base.metadata.create_all(self.engine)  # creates the table where it is missing, leaves one there

    def close(self) -> None:
        self.engine.dispose()

    def _put(self, owner: str, stored: StoredResponse) -> None:
        row = StoredResponseRow(id=stored.response["id"], owner=owner, created_at=time.time(),
                                model=stored.response["model"], response=stored.response,
                                input_items=stored.input_items, conversation=stored.conversation)
        with Session(self.engine) as s, s.begin():
            s.add(row)

    def _get(self, owner: str, response_id: str) -> StoredResponse | None:
        with Session(self.engine) as s:
            row = s.scalars(select(StoredResponseRow).where(StoredResponseRow.id == response_id,
                                                            StoredResponseRow.owner == owner)).first()
            return None if row is None else StoredResponse(row.response, row.input_items, row.conversation)

    def _delete(self, owner: str, response_id: str) -> bool:
        with Session(self.engine) as s, s.begin():
            done = s.execute(delete(StoredResponseRow).where(StoredResponseRow.id == response_id,
                                                             StoredResponseRow.owner == owner))
            return bool(done.rowcount)  # type: ignore[attr-defined]

    async def put(self, owner: str, stored: StoredResponse) -> None:
        await asyncio.to_thread(self._put, owner, stored)

    async def get(self, owner: str, response_id: str) -> StoredResponse | None:
        return await asyncio.to_thread(self._get, owner, response_id)

    async def delete(self, owner: str, response_id: str) -> bool:
        return await asyncio.to_thread(self._delete, owner, response_id)
