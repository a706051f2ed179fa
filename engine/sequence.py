"""One request inside the engine: its prompt ids, its KV slot, what it has generated and how it streams.

`admit` turns a request into a sequence: it builds the prompt, fits it to the context when the request asks
(`fit`), and refuses one that still does not fit.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field, replace

from engine.detok import BlockEnd, IncrementalDecoder, StopStrings
from engine.errors import PromptError
from engine.events import Event, Stats, TextClipped, TurnsDropped
from engine.prompts import answer_room, build_prompt, cursor_line, fit_chat, fit_request, stop_ids, turn_stops
from engine.requests import Request
from engine.runner import Row
from engine.speculate import Proposer
from engine.tokenizer import Tokenizer


@dataclass(eq=False)
class SequenceState:
    """A request from admission to its end (compared by identity: the scheduler's queues hold each once)."""

    request: Request
    ids: list[int]
    stops: set[int]
    decoder: IncrementalDecoder
    stop_strings: StopStrings
    block_end: BlockEnd | None  # with `Request.stop_at_block_end`
    seed: int
    t0: float
    slot: int = -1
    cached: int = 0  # prompt tokens the prefix cache held when the sequence took its slot
    done: int = 0  # prompt tokens whose keys/values are in the slot
    generated: list[int] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    t_first: float = 0.0
    strip_leading: bool = False
    steps: int = 0  # decode steps that gave it tokens (plain or verify)
    proposer: Proposer | None = None  # with speculation: its prompt and tokens, indexed for lookups

    def row(self, token: int) -> Row:
        """This sequence's row of a decode step that feeds `token`."""
        p = self.request.sampling
        return Row(
            token=token,
            position=len(self.ids) + len(self.generated) - 1,
            slot=self.slot,
            top_k=p.top_k,
            seed=self.seed,
            offset=len(self.generated),
            temperature=p.temperature,
            top_p=p.top_p,
            penalty=p.repetition_penalty,
        )

    def in_slot(self) -> list[int]:
        """The tokens whose keys/values the slot holds, from position 0: the prefilled prompt and every generated
        token but the last, which no step has fed yet."""
        if self.done < len(self.ids):
            return self.ids[: self.done]
        return self.ids + self.generated[:-1]

    def stats(self) -> Stats:
        now = time.perf_counter()
        ttft = (self.t_first or now) - self.t0
        p = self.proposer
        return Stats(
            len(self.ids), len(self.generated), ttft, now - self.t0, self.cached, self.steps,
            p.proposed if p is not None else 0, p.accepted if p is not None else 0,
        )  # fmt: skip


def admit(tok: Tokenizer, request: Request, context: int, events: list[Event]) -> SequenceState:
    """The sequence for a request, appending to `events` what fitting it left out; raises PromptError (and
    ValueError for bad values) for a request that cannot run."""
    request.check()
    ids = build_prompt(tok, request)
    budget = context - answer_room(request.sampling.max_new_tokens, context)
    if request.fit and len(ids) > budget:
        if request.cap == "chat":
            messages, dropped = fit_chat(tok, request.messages, budget)
            request = replace(request, messages=messages)
            if dropped:
                events.append(TurnsDropped(request.id, dropped))
        else:
            request, before, after = fit_request(tok, request, budget)
            events.append(TextClipped(request.id, before, after))
        ids = build_prompt(tok, request)
    if len(ids) >= context:
        raise PromptError(
            f"the prompt is {len(ids)} tokens but the context holds {context}: {len(ids) - context + 1} tokens too many"
        )
    return SequenceState(
        request=request,
        ids=ids,
        stops=stop_ids(tok, request.cap),
        decoder=IncrementalDecoder(tok),
        stop_strings=StopStrings(request.sampling.stop + turn_stops(tok, request.cap)),
        block_end=BlockEnd(cursor_line(request)) if request.stop_at_block_end else None,
        seed=request.sampling.seed if request.sampling.seed is not None else random.getrandbits(62),
        t0=time.perf_counter(),
        strip_leading=request.cap == "chat",
    )
