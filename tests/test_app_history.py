"""Pilot tests of the chat history in the app: every turn saved, ctrl+r to list, resume and delete, a database that
cannot be used, and a resumed chat sending the model what the original conversation would have."""

from __future__ import annotations

import functools
import sqlite3
from dataclasses import replace
from pathlib import Path

import pytest
from textual.widgets import OptionList

from engine.prompts import build_prompt
from engine.requests import ChatMessage, EngineSpec, Request
from tests.fakes import INFO, FakeClient
from tests.test_app import ready, wait_for
from tui.app import CodeLlamaApp
from tui.history import ChatRecord, HistoryStore, Turn, TurnEnd, history_path
from tui.history_screen import HistoryScreen
from tui.screens import ConfirmScreen
from widgets.chat_log import Answer, UserMessage

SYSTEM = "Answer in Python"


def chat_app(history: bool = True, **fake: object) -> CodeLlamaApp:
    app = CodeLlamaApp(
        None, EngineSpec(), "chat", SYSTEM, text="x = 1\n", client_factory=functools.partial(FakeClient, **fake),
        history=history,
    )  # fmt: skip
    return app


async def say(pilot, text: str) -> Request:
    app = pilot.app
    sent = len(app.client.submitted)
    app.chat_input.load_text(text)
    await pilot.press("f5")
    await wait_for(pilot, lambda: len(app.client.submitted) > sent and not app._jobs)
    return app.client.submitted[-1]


def answers(n: int) -> list[str]:
    return [f"answer {i}:\n\n```python\nx = {i}\n```\n" for i in range(n)]


async def test_every_turn_is_saved_with_the_conversation() -> None:
    app = chat_app(answers={"chat": answers(2)})
    async with app.run_test() as pilot:
        await ready(pilot)
        await say(pilot, "first\nwith a second line")
        await say(pilot, "second")
    [summary] = HistoryStore().conversations()
    assert (summary.title, summary.model, summary.turns) == ("first", INFO.name, 2)
    record = HistoryStore().load(summary.id)
    assert record.system == SYSTEM
    assert record.exchanges == [("first\nwith a second line", answers(2)[0]), ("second", answers(2)[1])]
    assert [(t.cap, t.user, t.answer, t.ended) for t in record.turns] == [
        ("chat", "first\nwith a second line", answers(2)[0], TurnEnd.FINISHED),
        ("chat", "second", answers(2)[1], TurnEnd.FINISHED),
    ]
    assert record.created <= record.turns[0].at <= record.updated == record.turns[1].at


async def test_a_stopped_answer_and_one_cut_by_quitting_are_kept_but_not_sent_again() -> None:
    app = chat_app(hold=True)
    async with app.run_test() as pilot:
        await ready(pilot)
        app.chat_input.load_text("stop me")
        await pilot.press("f5")
        await wait_for(pilot, lambda: app.chat_log.last_answer)
        await pilot.press("escape")
        app.client.release.clear()
        app.chat_input.load_text("quit during me")
        await pilot.press("f5")
        await wait_for(pilot, lambda: "quit during me" in app.client.submitted[-1].messages[-1].content)
        await wait_for(pilot, lambda: app._jobs and next(iter(app._jobs.values())).deltas)
        await pilot.press("ctrl+q")
    record = HistoryStore().load(HistoryStore().conversations()[0].id)
    assert [(t.user, t.answer, t.ended) for t in record.turns] == [
        ("stop me", "Her", TurnEnd.STOPPED),
        ("quit during me", "Her", TurnEnd.STOPPED),
    ]
    assert record.exchanges == []


@pytest.mark.parametrize("dropped", [False, True], ids=["whole", "oldest-dropped"])
async def test_a_resumed_chat_sends_what_the_original_would_have(dropped: bool) -> None:
    """Four turns in one app, against three turns in one app then the fourth in another after ctrl+r: the fourth
    request is the same. With a small context the third turn dropped the oldest, and the resumed chat knows it."""
    fake = {"answers": {"chat": answers(4)}}
    if dropped:
        fake |= {"info": replace(INFO, context=96), "chars_per_token": 1}
    original = chat_app(**fake)
    async with original.run_test() as pilot:
        await ready(pilot)
        for text in ("first", "second", "third", "fourth"):
            continuous = await say(pilot, text)
        dropped_turns = sum(1 for _ in original.query(".-warning"))
    assert bool(dropped_turns) == dropped
    for conversation in HistoryStore().conversations():
        HistoryStore().delete(conversation.id)

    before = chat_app(**fake)
    async with before.run_test() as pilot:
        await ready(pilot)
        for text in ("first", "second", "third"):
            await say(pilot, text)
        kept = list(before.conversation.exchanges)
    resumed = chat_app(**fake)
    resumed.cap = "completion"
    async with resumed.run_test() as pilot:
        await ready(pilot)
        await pilot.press("ctrl+r")
        assert isinstance(resumed.screen, HistoryScreen)
        assert resumed.screen.query_one(OptionList).option_count == 1
        await pilot.press("enter")
        assert not isinstance(resumed.screen, HistoryScreen)
        assert resumed.conversation.exchanges == kept and resumed.cap == "chat"
        users = [str(m.render()) for m in resumed.chat_log.query(UserMessage)]
        assert users == ["first", "second", "third"] and len(resumed.chat_log.query(Answer)) == 3
        assert resumed.chat_log.last_answer == answers(4)[2]
        after = await say(pilot, "fourth")
    assert after.messages == continuous.messages
    assert after.messages[0] == ChatMessage("system", SYSTEM)
    assert (len(after.messages) < 8) if dropped else (len(after.messages) == 8)
    [summary] = HistoryStore().conversations()
    assert summary.turns == 4  # the resumed chat goes on in the same conversation


async def test_resumed_prompt_ids_match(tok) -> None:
    """The same, in the ids the engine builds (the real tokenizer, Meta's [INST] format)."""
    original = chat_app(answers={"chat": answers(3)})
    async with original.run_test() as pilot:
        await ready(pilot)
        for text in ("first", "second", "third"):
            continuous = await say(pilot, text)
    HistoryStore().delete(HistoryStore().conversations()[0].id)
    for step in ("first", "resume"):
        app = chat_app(answers={"chat": answers(3)})
        async with app.run_test() as pilot:
            await ready(pilot)
            if step == "first":
                await say(pilot, "first")
                await say(pilot, "second")
            else:
                await pilot.press("ctrl+r", "enter")
                resumed = await say(pilot, "third")
    assert build_prompt(tok, resumed) == build_prompt(tok, continuous)


async def test_delete_asks_first_then_the_list_forgets_it() -> None:
    app = chat_app(answers={"chat": answers(3)})
    async with app.run_test() as pilot:
        await ready(pilot)
        for text in ("keep me", "delete me", "current"):
            await pilot.press("ctrl+n")
            await say(pilot, text)
        await pilot.press("ctrl+r", "down")
        options = app.screen.query_one(OptionList)
        assert options.option_count == 3 and options.highlighted == 1  # newest first: current, delete me, keep me
        await pilot.press("ctrl+d")
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("n")
        assert options.option_count == 3
        await pilot.press("ctrl+d", "y")
        assert isinstance(app.screen, HistoryScreen) and options.option_count == 2
        assert options.highlighted == 1  # the next one stands where the deleted one stood
        assert [c.title for c in HistoryStore().conversations()] == ["current", "keep me"]
        await pilot.press("up", "ctrl+d", "y", "escape")
        assert [c.title for c in HistoryStore().conversations()] == ["keep me"]
        assert not app.chat_log.query(UserMessage)  # the conversation on screen was deleted: a new chat
        await say(pilot, "after")
    assert sorted(c.title for c in HistoryStore().conversations()) == ["after", "keep me"]


async def test_the_filter_is_fuzzy() -> None:
    app = chat_app(answers={"chat": answers(3)})
    async with app.run_test() as pilot:
        await ready(pilot)
        for text in ("sort a list", "parse json", "fix the regex"):
            await say(pilot, text)
            await pilot.press("ctrl+n")
        await pilot.press("ctrl+r")
        options = app.screen.query_one(OptionList)
        assert options.option_count == 3
        await pilot.press("p", "j", "s")
        assert options.option_count == 1
        await pilot.press("enter")
        assert [str(m.render()) for m in app.chat_log.query(UserMessage)] == ["parse json"]


async def test_a_corrupt_database_is_a_note_and_the_chat_goes_on() -> None:
    path = history_path()
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not sqlite " * 100)
    app = chat_app(answers={"chat": answers(2)})
    async with app.run_test() as pilot:
        await ready(pilot)
        await say(pilot, "first")
        note = app.status.render_text()
        assert "chat not saved" in note and "not a database" in note
        await say(pilot, "second")
        assert [u for u, _ in app.conversation.exchanges] == ["first", "second"]  # nothing lost in memory
        assert app.chat_record.turns[-1].user == "second"
        await pilot.press("ctrl+r")
        assert "not a database" in str(app.screen.query_one("#problem").render())
        await pilot.press("escape")
    assert path.read_bytes() == b"not sqlite " * 100


async def test_another_app_on_the_same_history_at_the_same_time() -> None:
    app = chat_app(answers={"chat": answers(2)})
    async with app.run_test() as pilot:
        await ready(pilot)
        await say(pilot, "mine")
        theirs = ChatRecord()  # what a second app, open meanwhile, keeps through its own connection
        theirs.add(Turn("chat", "theirs", "ok"), [("theirs", "ok")], "CodeLlama-13b-Instruct-hf")
        other = HistoryStore()
        other.save(theirs)
        await say(pilot, "mine again")
        await pilot.press("ctrl+r")
        assert app.screen.query_one(OptionList).option_count == 2
        assert other.load(app.chat_record.id).turns == app.chat_record.turns  # each sees the other's writes
    assert [c.title for c in HistoryStore().conversations()] == ["mine", "theirs"]


async def test_a_locked_database_is_a_note_and_the_next_turn_saves_both() -> None:
    app = chat_app(answers={"chat": answers(2)})
    async with app.run_test() as pilot:
        await ready(pilot)
        path = history_path()
        path.parent.mkdir(parents=True)
        sqlite3.connect(path).execute("PRAGMA user_version").fetchone()  # an empty database
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN EXCLUSIVE")  # another app holds it
        await say(pilot, "first")
        assert "chat not saved" in app.status.render_text() and "locked" in app.status.render_text()
        other.execute("ROLLBACK")
        await say(pilot, "second")
    record = HistoryStore().load(app.chat_record.id)
    assert [t.user for t in record.turns] == ["first", "second"] and len(record.exchanges) == 2


async def test_history_off_keeps_nothing(tmp_path: Path) -> None:
    app = chat_app(history=False)
    async with app.run_test() as pilot:
        await ready(pilot)
        await say(pilot, "secret")
        await pilot.press("ctrl+r")
        assert not isinstance(app.screen, HistoryScreen) and "history = false" in app.status.render_text()
    assert not history_path().exists()


async def test_quitting_mid_answer_with_a_corrupt_database_still_quits_cleanly() -> None:
    path = history_path()
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not sqlite " * 100)
    app = chat_app(hold=True)
    async with app.run_test() as pilot:
        await ready(pilot)
        app.chat_input.load_text("quit during me")
        await pilot.press("f5")
        await wait_for(pilot, lambda: app._jobs and next(iter(app._jobs.values())).deltas)
        await pilot.press("ctrl+q")
    assert app.return_code == 0 and app.chat_record.turns[-1].ended is TurnEnd.STOPPED
    assert path.read_bytes() == b"not sqlite " * 100
