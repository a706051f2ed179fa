"""A request in flight and where its text goes."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from engine.requests import Request
from tui.suggestions import FillTally


class JobKind(Enum):
    """Where a request's text goes."""

    GHOST = "ghost"  # a suggestion shown at the editor's cursor until Tab takes it
    FILL = "fill"  # written into the editor where a <FILL> marker (or the cursor) stood
    CHAT = "chat"  # an answer in the chat log


@dataclass
class Job:
    """A request in flight, with what its end needs to know."""

    request: Request
    kind: JobKind
    opening: str = ""  # Markdown that starts a chat-log answer (opens a fence)
    closing: str = ""  # Markdown that ends a chat-log answer (closes an opened fence)
    next_marker: bool = False  # a fill that goes on to the next <FILL> marker when it ends
    clipped: str = ""  # what its text lost when the file outgrew the context (for the status line)
    tally: FillTally | None = None  # the fills of one F3 so far (its markers share one)
    started: float = 0.0
    deltas: int = 0
    text: str = ""  # what arrived so far

    @property
    def in_editor(self) -> bool:
        """Its text goes into the editor (an edit there cancels it)."""
        return self.kind in (JobKind.GHOST, JobKind.FILL)
