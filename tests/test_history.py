"""The chat history store (tui/history.py): what it keeps, two apps at once, and every way the database can fail."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from tui.history import SCHEMA_VERSION, ChatRecord, HistoryError, HistoryStore, Turn, TurnEnd, history_path, title_of


def _record(user: str = "first question\nmore", answer: str = "an answer", at: float = 100.0) -> ChatRecord:
    record = ChatRecord("Answer in Python", created=at)
    record.add(Turn("chat", user, answer, at=at), [(user, answer)], "CodeLlama-7b-Instruct-hf")
    return record


def test_where_it_lives(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    assert history_path() == tmp_path / "codellama-tui" / "history.sqlite3"
    monkeypatch.delenv("XDG_DATA_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert history_path() == tmp_path / ".local" / "share" / "codellama-tui" / "history.sqlite3"


def test_a_saved_conversation_comes_back_whole(tmp_path: Path) -> None:
    store = HistoryStore(tmp_path / "h.sqlite3")
    record = _record()
    record.add(Turn("chat", "second", "cut sh", TurnEnd.INTERRUPTED, at=101.0), record.exchanges, "m2")
    store.save(record)
    again = HistoryStore(tmp_path / "h.sqlite3").load(record.id)
    assert again == record
    assert again.exchanges == [("first question\nmore", "an answer")]  # the interrupted turn is not in it
    [summary] = store.conversations()
    assert (summary.title, summary.model, summary.updated, summary.turns) == ("first question", "m2", 101.0, 2)
    assert (tmp_path / "h.sqlite3").stat().st_mode & 0o777 == 0o600  # the user's own conversations
    db = sqlite3.connect(tmp_path / "h.sqlite3")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_newest_first_and_delete_takes_the_turns_too(tmp_path: Path) -> None:
    store = HistoryStore(tmp_path / "h.sqlite3")
    old, new = _record("old", at=1.0), _record("new", at=2.0)
    store.save(old)
    store.save(new)
    assert [c.title for c in store.conversations()] == ["new", "old"]
    store.delete(new.id)
    assert [c.title for c in store.conversations()] == ["old"]
    db = sqlite3.connect(tmp_path / "h.sqlite3")
    assert db.execute("SELECT count(*) FROM turns WHERE conversation = ?", (new.id,)).fetchone() == (0,)
    with pytest.raises(HistoryError, match="no longer in the history"):
        store.load(new.id)


def test_two_apps_at_once(tmp_path: Path) -> None:
    """Two stores on one file (two app instances) write turns in turn; each sees the other's."""
    one, two = HistoryStore(tmp_path / "h.sqlite3"), HistoryStore(tmp_path / "h.sqlite3")
    a, b = _record("from one", at=1.0), _record("from two", at=2.0)
    for n in range(3):
        one.save(a)
        two.save(b)
        a.add(Turn("chat", f"a{n}", "x", at=3.0 + n), a.exchanges, "m")
        b.add(Turn("chat", f"b{n}", "y", at=3.5 + n), b.exchanges, "m")
    one.save(a)
    two.save(b)
    assert [c.title for c in one.conversations()] == ["from two", "from one"]
    assert two.load(a.id).turns == a.turns and one.load(b.id).turns == b.turns


def test_a_locked_database_fails_in_a_moment_and_the_next_save_keeps_everything(tmp_path: Path) -> None:
    store = HistoryStore(tmp_path / "h.sqlite3")
    record = _record()
    store.save(record)
    other = sqlite3.connect(tmp_path / "h.sqlite3", isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")  # another app in the middle of a write
    record.add(Turn("chat", "second", "two"), [*record.exchanges, ("second", "two")], "m")
    with pytest.raises(HistoryError, match="locked"):
        store.save(record)
    other.execute("ROLLBACK")
    record.add(Turn("chat", "third", "three"), [*record.exchanges, ("third", "three")], "m")
    store.save(record)
    assert store.load(record.id) == record


def test_a_corrupt_file_is_one_line_and_never_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "h.sqlite3"
    junk = b"this is not a database\n" * 200
    path.write_bytes(junk)
    store = HistoryStore(path)
    with pytest.raises(HistoryError) as caught:
        store.save(_record())
    assert "not a database" in str(caught.value) and "\n" not in str(caught.value)
    with pytest.raises(HistoryError):
        store.conversations()
    assert path.read_bytes() == junk


def test_a_read_only_database_can_still_be_listed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "h.sqlite3"
    record = _record()
    HistoryStore(path).save(record)
    connect = sqlite3.connect
    monkeypatch.setattr(sqlite3, "connect", lambda p, **kw: connect(f"file:{p}?mode=ro", uri=True, **kw))
    store = HistoryStore(path)  # a file this user may not write (root ignores permissions, so opened read-only)
    assert [c.id for c in store.conversations()] == [record.id]
    with pytest.raises(HistoryError, match="readonly"):
        store.save(_record("another"))


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "h.sqlite3"
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(HistoryError, match="newer codellama-tui"):
        HistoryStore(path).conversations()


def test_unencodable_text_is_kept_as_the_engine_saw_it(tmp_path: Path) -> None:
    store = HistoryStore(tmp_path / "h.sqlite3")
    record = _record("what is \udcff here?", "ans")
    store.save(record)
    assert store.load(record.id).exchanges == [("what is \ufffd here?", "ans")]


def test_title_is_the_first_non_blank_line_clipped() -> None:
    assert title_of("\n\n  hello  \nworld") == "hello"
    assert title_of("x" * 200) == "x" * 79 + "…"
