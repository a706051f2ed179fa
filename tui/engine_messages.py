"""The engine's events as Textual messages: one Message class per event, so the app handles each with its own `@on`.

The client calls the app's sink on its own thread; the sink posts `engine_message(event)` and never touches a
widget. Text deltas are the exception: the app batches them (see tui/app.py) instead of posting one per token.
"""

from __future__ import annotations

from typing import Generic, TypeVar

from textual.message import Message

from engine import events

E = TypeVar("E")


class EngineMessage(Message, Generic[E]):
    """An engine event carried from the client's thread to the UI thread."""

    def __init__(self, event: E) -> None:
        super().__init__()
        self.event = event


class EngineLoading(EngineMessage[events.Loading]):
    """Loading progress."""


class EngineReady(EngineMessage[events.Ready]):
    """The engine (or the server) is ready to serve."""


class EngineLoadFailed(EngineMessage[events.LoadFailed]):
    """The engine could not be built or the server reached."""


class EngineLink(EngineMessage[events.Link]):
    """The connection to a server went up or down."""


class RequestStarted(EngineMessage[events.Started]):
    """A request was accepted."""


class RequestClipped(EngineMessage[events.TextClipped]):
    """A request's text outgrew the context and lines were left out."""


class RequestTurnsDropped(EngineMessage[events.TurnsDropped]):
    """A chat outgrew the context and its oldest turns were left out."""


class RequestFinished(EngineMessage[events.Finished]):
    """A request ended."""


class RequestFailed(EngineMessage[events.Failed]):
    """A request failed."""


_MESSAGES: dict[type, type[EngineMessage]] = {
    events.Loading: EngineLoading,
    events.Ready: EngineReady,
    events.LoadFailed: EngineLoadFailed,
    events.Link: EngineLink,
    events.Started: RequestStarted,
    events.TextClipped: RequestClipped,
    events.TurnsDropped: RequestTurnsDropped,
    events.Finished: RequestFinished,
    events.Failed: RequestFailed,
}


def engine_message(event: events.Event) -> EngineMessage:
    """The message that carries `event` (every event but `TextDelta`, which the app batches)."""
    return _MESSAGES[type(event)](event)
