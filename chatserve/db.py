"""Databases the services keep (the web UI's history, the gateway's stored responses): a SQLAlchemy URL
from a setting, and an engine with SQLite's pragmas for several processes on one file."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine


def database_url(target: str) -> str:
    """A SQLAlchemy URL as is; anything else is a SQLite file path (its folder is created)."""
    if "://" in target:
        return target
    path = Path(os.path.expanduser(target)).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def open_engine(url: str) -> Engine:
    """An engine for `url`; on SQLite, foreign keys on, WAL (readers beside one writer, several processes)
    and a busy timeout instead of an immediate "database is locked"."""
    engine = create_engine(url)
    if engine.dialect.name == "sqlite":
        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=5000")
            cur.close()
    return engine
