"""Storage of conversations, messages, votes and arena battles (SQLAlchemy 2.0; SQLite by default).

The schema is owned by the Alembic migrations in `webui/migrations/`; `Store(url)` upgrades the database
to the newest revision before use, so an old file (or a shared PostgreSQL database) is brought forward
on start-up. Every method opens its own short session, so callbacks running in Gradio's worker threads
can share one `Store`.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
    select,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

from chatserve.db import database_url, open_engine

VOTE_KINDS = ("upvote", "downvote", "flag")
BATTLE_WINNERS = ("model_a", "model_b", "tie", "tie (bothbad)")


class Base(DeclarativeBase):
    pass


class Conversation(Base):
    __tablename__ = "conversations"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    owner: Mapped[str] = mapped_column(String(200), index=True)
    title: Mapped[str] = mapped_column(String(200), default="New chat")
    model: Mapped[str] = mapped_column(String(200), default="")
    system_prompt: Mapped[str] = mapped_column(Text, default="")
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    mode: Mapped[str] = mapped_column(String(16), default="chat")  # chat | arena
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float, index=True)
    messages: Mapped[list[Message]] = relationship(back_populates="conversation", order_by="Message.position",
                                                   cascade="all, delete-orphan")


class Message(Base):
    __tablename__ = "messages"
    __table_args__ = (UniqueConstraint("conversation_id", "position"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    conversation_id: Mapped[str] = mapped_column(ForeignKey("conversations.id", ondelete="CASCADE"), index=True)
    position: Mapped[int] = mapped_column(Integer)
    role: Mapped[str] = mapped_column(String(16))
    content: Mapped[str] = mapped_column(Text)
    model: Mapped[str | None] = mapped_column(String(200), nullable=True)
    created_at: Mapped[float] = mapped_column(Float)
    ttft_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    duration_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    prompt_tokens: Mapped[int | None] = mapped_column(Integer, nullable=True)
    completion_tokens: Mapped[int | None] = mapped_column(Integer, nullable=True)
    finish_reason: Mapped[str | None] = mapped_column(String(32), nullable=True)
    conversation: Mapped[Conversation] = relationship(back_populates="messages")
    votes: Mapped[list[Vote]] = relationship(cascade="all, delete-orphan")


class Vote(Base):
    __tablename__ = "votes"
    __table_args__ = (UniqueConstraint("message_id", "owner", "kind"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    message_id: Mapped[int] = mapped_column(ForeignKey("messages.id", ondelete="CASCADE"), index=True)
    owner: Mapped[str] = mapped_column(String(200))
    kind: Mapped[str] = mapped_column(String(16))  # upvote | downvote | flag
    created_at: Mapped[float] = mapped_column(Float)


class Battle(Base):
    __tablename__ = "battles"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    owner: Mapped[str] = mapped_column(String(200))
    model_a: Mapped[str] = mapped_column(String(200), index=True)
    model_b: Mapped[str] = mapped_column(String(200), index=True)
    winner: Mapped[str] = mapped_column(String(16))  # model_a | model_b | tie | tie (bothbad)
    anonymous: Mapped[bool] = mapped_column(Boolean)
    conversation_a: Mapped[str | None] = mapped_column(ForeignKey("conversations.id", ondelete="SET NULL"), nullable=True)
    conversation_b: Mapped[str | None] = mapped_column(ForeignKey("conversations.id", ondelete="SET NULL"), nullable=True)
    created_at: Mapped[float] = mapped_column(Float, index=True)


@dataclass(frozen=True)
class StoredMessage:
    role: str
    content: str
    model: str | None = None
    ttft_s: float | None = None
    duration_s: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    finish_reason: str | None = None


def upgrade(url: str) -> None:
    """Bring the database at `url` to the newest migration."""
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    command.upgrade(cfg, "head")


def new_id() -> str:
    return uuid.uuid4().hex


class Store:
    def __init__(self, target: str, migrate: bool = True) -> None:
        self.url = database_url(target)
        if migrate:
            upgrade(self.url)
        self.engine = open_engine(self.url)

    def close(self) -> None:
        self.engine.dispose()

    # --- conversations ----------------------------------------------------------------------------------

    def create_conversation(self, owner: str, *, title: str = "New chat", model: str = "", system_prompt: str = "",
                            params: dict[str, Any] | None = None, mode: str = "chat") -> str:
        now, conv_id = time.time(), new_id()
        conv = Conversation(id=conv_id, owner=owner, title=title[:200] or "New chat", model=model,
                            system_prompt=system_prompt, params=params or {}, mode=mode, created_at=now, updated_at=now)
        with Session(self.engine) as s, s.begin():
            s.add(conv)
        return conv_id

    def list_conversations(self, owner: str, mode: str = "chat", limit: int = 200) -> list[tuple[str, str]]:
        """(id, title) of the owner's conversations, newest activity first."""
        q = (select(Conversation.id, Conversation.title).where(Conversation.owner == owner, Conversation.mode == mode)
             .order_by(Conversation.updated_at.desc()).limit(limit))
        with Session(self.engine) as s:
            return [(r.id, r.title) for r in s.execute(q)]

    def get_conversation(self, conv_id: str, owner: str | None = None) -> Conversation | None:
        """The conversation with its messages loaded (None if absent or another owner's)."""
        with Session(self.engine, expire_on_commit=False) as s:
            conv = s.get(Conversation, conv_id)
            if conv is None or (owner is not None and conv.owner != owner):
                return None
            _ = list(conv.messages)
            s.expunge_all()
            return conv

    def update_conversation(self, conv_id: str, owner: str, **fields: Any) -> bool:
        allowed = {"title", "model", "system_prompt", "params"}
        with Session(self.engine) as s, s.begin():
            conv = s.get(Conversation, conv_id)
            if conv is None or conv.owner != owner:
                return False
            for k, v in fields.items():
                if k not in allowed:
                    raise ValueError(f"not an updatable field: {k}")
                setattr(conv, k, v[:200] if k == "title" else v)
            conv.updated_at = time.time()
        return True

    def delete_conversation(self, conv_id: str, owner: str) -> bool:
        with Session(self.engine) as s, s.begin():
            conv = s.get(Conversation, conv_id)
            if conv is None or conv.owner != owner:
                return False
            s.delete(conv)
        return True

    def replace_messages(self, conv_id: str, owner: str, messages: list[StoredMessage], **fields: Any) -> list[int]:
        """Make the stored messages equal `messages`, keeping rows (and their votes) of the unchanged prefix.

        Returns the message ids in order. One transaction: a crash never leaves half a history.
        """
        with Session(self.engine) as s, s.begin():
            conv = s.get(Conversation, conv_id)
            if conv is None or conv.owner != owner:
                raise KeyError(conv_id)
            existing = list(conv.messages)
            keep = 0
            while (keep < min(len(existing), len(messages)) and existing[keep].role == messages[keep].role
                   and existing[keep].content == messages[keep].content
                   # a message that says how it ended replaces a row that said otherwise (interrupted -> stop)
                   and messages[keep].finish_reason in (None, existing[keep].finish_reason)):
                keep += 1
            for row in existing[keep:]:
                s.delete(row)
            s.flush()
            now = time.time()
            for pos, m in enumerate(messages[keep:], start=keep):
                s.add(Message(conversation_id=conv_id, position=pos, created_at=now, **m.__dict__))
            for k, v in fields.items():
                setattr(conv, k, v)
            conv.updated_at = now
            s.flush()
            return [m.id for m in sorted(s.scalars(select(Message).where(Message.conversation_id == conv_id)),
                                         key=lambda m: m.position)]

    # --- feedback ---------------------------------------------------------------------------------------

    def vote(self, conv_id: str, position: int, owner: str, kind: str) -> bool:
        """Record a vote on the message at `position`; an upvote replaces a downvote and vice versa."""
        if kind not in VOTE_KINDS:
            raise ValueError(f"unknown vote kind {kind!r}")
        with Session(self.engine) as s, s.begin():
            conv = s.get(Conversation, conv_id)
            if conv is None or conv.owner != owner:
                return False
            msg = s.scalar(select(Message).where(Message.conversation_id == conv_id, Message.position == position))
            if msg is None or msg.role != "assistant":
                return False
            rivals = {"upvote": ("downvote",), "downvote": ("upvote",), "flag": ()}[kind]
            for v in list(msg.votes):
                if v.owner == owner and (v.kind in rivals or v.kind == kind):
                    s.delete(v)
            s.flush()
            s.add(Vote(message_id=msg.id, owner=owner, kind=kind, created_at=time.time()))
        return True

    def votes(self, conv_id: str) -> list[tuple[int, str]]:
        """(position, kind) of every vote in a conversation."""
        q = (select(Message.position, Vote.kind).join(Vote, Vote.message_id == Message.id)
             .where(Message.conversation_id == conv_id).order_by(Message.position))
        with Session(self.engine) as s:
            return [(r.position, r.kind) for r in s.execute(q)]

    # --- arena ------------------------------------------------------------------------------------------

    def record_battle(self, owner: str, model_a: str, model_b: str, winner: str, anonymous: bool,
                      conversation_a: str | None = None, conversation_b: str | None = None) -> int:
        if winner not in BATTLE_WINNERS:
            raise ValueError(f"unknown battle outcome {winner!r}")
        b = Battle(owner=owner, model_a=model_a, model_b=model_b, winner=winner, anonymous=anonymous,
                   conversation_a=conversation_a, conversation_b=conversation_b, created_at=time.time())
        with Session(self.engine) as s, s.begin():
            s.add(b)
            s.flush()
            return b.id

    def battles(self) -> list[tuple[str, str, str]]:
        """(model_a, model_b, winner) of every battle, oldest first (the order online Elo needs)."""
        q = select(Battle.model_a, Battle.model_b, Battle.winner).order_by(Battle.created_at, Battle.id)
        with Session(self.engine) as s:
            return [(r.model_a, r.model_b, r.winner) for r in s.execute(q)]

    # --- export -----------------------------------------------------------------------------------------

    def all_conversations(self, owner: str | None = None) -> list[Conversation]:
        """Every conversation (optionally one owner's) with its messages, oldest first."""
        q = select(Conversation).order_by(Conversation.created_at)
        if owner is not None:
            q = q.where(Conversation.owner == owner)
        with Session(self.engine, expire_on_commit=False) as s:
            convs = list(s.scalars(q))
            for c in convs:
                _ = list(c.messages)
            s.expunge_all()
            return convs
