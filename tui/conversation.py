"""A chat's history, kept where the conversation is built: in the front end, since the engine keeps none.

Every turn sends the whole conversation (`Request.messages`, with `fit`). When it outgrows the context, the
engine leaves out the oldest exchanges and says how many (`TurnsDropped`); the conversation forgets the same ones,
so its next turn starts where that prompt did and the prefix cache can serve it.
"""

from __future__ import annotations

from engine.requests import ChatMessage, Request, SamplingParams


class Conversation:
    """The system instruction and the finished exchanges of one chat."""

    def __init__(self, system: str | None = None) -> None:
        self.system = system
        self.exchanges: list[tuple[str, str]] = []

    def request(self, user: str, sampling: SamplingParams, speculate: bool = False) -> Request:
        """The next turn: everything so far, then the user's new message (`speculate`: `Request.speculate`)."""
        messages = [ChatMessage("system", self.system)] if self.system is not None else []
        for asked, answer in self.exchanges:
            messages += [ChatMessage("user", asked), ChatMessage("assistant", answer)]
        messages.append(ChatMessage("user", user))
        return Request("chat", messages=tuple(messages), fit=True, sampling=sampling, speculate=speculate)

    def answered(self, request: Request, answer: str) -> None:
        """Keep a finished turn (a cancelled or failed one is not kept: the next turn asks again)."""
        self.exchanges.append((request.messages[-1].content, answer))

    def drop(self, count: int) -> None:
        """Forget the `count` oldest exchanges, as the engine left them out of the last prompt."""
        del self.exchanges[:count]
