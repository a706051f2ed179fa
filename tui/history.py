"""Chat history: every ended turn of a chat kept in SQLite, so that a conversation can be listed and resumed (ctrl+r).

One database, `$XDG_DATA_HOME/codellama-tui/history.sqlite3` (default `~/.local/share/codellama-tui/`), in WAL mode
so that two apps at once read and write it; its schema version is SQLite's `user_version`. A conversation is saved
whole after each turn: the exchanges exactly as `tui.conversation` holds them (so a resumed chat sends the model the
prompt the original would have), the system instruction, the model, and every turn as the chat log showed it.

A database that cannot be used (locked past a moment by another app, not a database, read-only, written by a newer
version) never stops the chat: each call raises `HistoryError` with a one-line reason, the conversation stays in
memory, and the next save writes it whole. The file is never replaced or repaired unasked.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from engine.requests import clean_text

SCHEMA_VERSION = 1
BUSY_TIMEOUT_S = 0.25  # the UI thread waits at most this long for another app's write
TITLE_CHARS = 80

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS conversations (
        id TEXT PRIMARY KEY,
        title TEXT NOT NULL,
        model TEXT NOT NULL,
        system TEXT,
        created REAL NOT NULL,
        updated REAL NOT NULL,
        exchanges TEXT NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS turns (
        conversation TEXT NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
        position INTEGER NOT NULL,
        cap TEXT NOT NULL,
        user TEXT NOT NULL,
        answer TEXT NOT NULL,
        ended TEXT NOT NULL,
        at REAL NOT NULL,
        PRIMARY KEY (conversation, position)
    )""",
    "CREATE INDEX IF NOT EXISTS conversations_by_update ON conversations (updated DESC)",
)


def history_path() -> Path:
    """Where the history lives, following the XDG base directory convention (data: the user's own records)."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "codellama-tui" / "history.sqlite3"


class HistoryError(Exception):
    """The history cannot be read or written now; the message is one line."""


class TurnEnd(str, Enum):
    """How a turn ended: only a finished chat turn joins the conversation the model sees next."""

    FINISHED = "finished"
    STOPPED = "stopped"  # Esc, a new chat, or the app quitting
    INTERRUPTED = "interrupted"  # failed after some text arrived
    FAILED = "failed"


@dataclass(frozen=True)
class Turn:
    """One message and its answer, as the chat log showed them (the answer's Markdown)."""

    cap: str
    user: str
    answer: str
    ended: TurnEnd = TurnEnd.FINISHED
    at: float = field(default_factory=time.time)


@dataclass
class ChatRecord:
    """One conversation as the history keeps it."""

    system: str | None = None
    model: str = ""
    exchanges: list[tuple[str, str]] = field(default_factory=list)
    turns: list[Turn] = field(default_factory=list)
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: float = field(default_factory=time.time)
    updated: float = 0.0

    @property
    def title(self) -> str:
        return title_of(self.turns[0].user) if self.turns else ""

    def add(self, turn: Turn, exchanges: list[tuple[str, str]], model: str) -> None:
        """A turn ended: keep it, with the conversation as it stands after it."""
        self.turns.append(turn)
        self.exchanges = list(exchanges)
        self.model = model or self.model
        self.updated = turn.at


@dataclass(frozen=True)
class ChatSummary:
    """A line of the history list."""

    id: str
    title: str
    model: str
    updated: float
    turns: int


def title_of(text: str) -> str:
    """A conversation's title: its first user message's first non-blank line, clipped."""
    line = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return line if len(line) <= TITLE_CHARS else line[: TITLE_CHARS - 1] + "…"


def _storable(text: str) -> str:
    """SQLite keeps UTF-8: a lone surrogate (a byte that was not UTF-8) is kept as U+FFFD, as the engine saw it."""
    return clean_text(text)[0]


class HistoryStore:
    """The history database, opened on first use; safe to keep using after any error."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or history_path()
        self._db: sqlite3.Connection | None = None

    def _connect(self) -> sqlite3.Connection:
        if self._db is not None:
            return self._db
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):  # readable by its owner only (an empty file is an empty database)
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        try:
            db.execute("PRAGMA foreign_keys = ON")
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise HistoryError(f"{self.path} was written by a newer codellama-tui (schema {version})")
            if version < SCHEMA_VERSION:
                db.execute("PRAGMA journal_mode = WAL")  # kept in the file: every later connection uses it
                with _transaction(db):
                    for statement in _SCHEMA:
                        db.execute(statement)
                    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except BaseException:
            db.close()
            raise
        self._db = db
        return db

    @contextlib.contextmanager
    def _using(self, doing: str) -> Iterator[sqlite3.Connection]:
        """The connection, with any failure turned into a one-line HistoryError."""
        try:
            yield self._connect()
        except HistoryError:
            raise
        except (sqlite3.Error, OSError) as err:
            if isinstance(err, sqlite3.DatabaseError) and not isinstance(err, sqlite3.OperationalError):
                self.close()  # a damaged file: open it afresh next time (it may have been replaced)
            reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
            raise HistoryError(f"cannot {doing} {self.path}: {reason}") from None

    def save(self, record: ChatRecord) -> None:
        """Write the conversation whole (a save that failed before is made good by the next one)."""
        exchanges = json.dumps([[_storable(u), _storable(a)] for u, a in record.exchanges], ensure_ascii=False)
        system = _storable(record.system) if record.system is not None else None
        row = (record.id, _storable(record.title), record.model, system, record.created, record.updated, exchanges)
        turns = [
            (record.id, i, t.cap, _storable(t.user), _storable(t.answer), t.ended.value, t.at)
            for i, t in enumerate(record.turns)
        ]
        with self._using("save the chat to") as db, _transaction(db):
            db.execute(
                "INSERT INTO conversations (id, title, model, system, created, updated, exchanges)"
                " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET title = excluded.title,"
                " model = excluded.model, system = excluded.system, updated = excluded.updated,"
                " exchanges = excluded.exchanges",
                row,
            )
            db.execute("DELETE FROM turns WHERE conversation = ? AND position >= ?", (record.id, len(turns)))
            db.executemany("INSERT OR REPLACE INTO turns VALUES (?, ?, ?, ?, ?, ?, ?)", turns)

    def conversations(self) -> list[ChatSummary]:
        """Every conversation, newest first."""
        with self._using("read") as db:
            rows = db.execute(
                "SELECT id, title, model, updated, (SELECT count(*) FROM turns WHERE conversation = id)"
                " FROM conversations ORDER BY updated DESC"
            ).fetchall()
        return [ChatSummary(*row) for row in rows]

    def load(self, conversation_id: str) -> ChatRecord:
        """One conversation, whole; HistoryError when it is gone or damaged."""
        with self._using("read") as db:
            row = db.execute(
                "SELECT system, model, created, updated, exchanges FROM conversations WHERE id = ?",
                (conversation_id,),
            ).fetchone()
            turns = db.execute(
                "SELECT cap, user, answer, ended, at FROM turns WHERE conversation = ? ORDER BY position",
                (conversation_id,),
            ).fetchall()
        if row is None:
            raise HistoryError("that conversation is no longer in the history")
        system, model, created, updated, exchanges = row
        try:
            pairs = [(str(u), str(a)) for u, a in json.loads(exchanges)]
            kept = [Turn(cap, user, answer, TurnEnd(ended), at) for cap, user, answer, ended, at in turns]
        except (ValueError, TypeError) as err:
            raise HistoryError(f"that conversation is damaged in {self.path}: {err}") from None
        return ChatRecord(system, model, pairs, kept, conversation_id, created, updated)

    def delete(self, conversation_id: str) -> None:
        with self._using("delete from") as db, _transaction(db):
            db.execute("DELETE FROM conversations WHERE id = ?", (conversation_id,))

    def close(self) -> None:
        if self._db is not None:
            with contextlib.suppress(sqlite3.Error):
                self._db.close()
            self._db = None


@contextlib.contextmanager
def _transaction(db: sqlite3.Connection) -> Iterator[None]:
    """One write transaction, its lock taken at the start (so that two apps queue instead of deadlocking)."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
        db.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            db.execute("ROLLBACK")
        raise
