"""The scheduler loop: admit -> prefill -> batched decode step -> sample -> emit.

Each `step()` admits waiting sequences into KV slots (the prefix cache picks the slot, and how much of the prompt
it already holds), prefills the prompts in line in one model pass of up to PREFILL_CHUNK tokens (a longer prompt
goes in chunks, its next one in the next step's pass), then decodes one token for every running sequence as one
batch, and returns the events that produced. A prefill costs a GPU about as much for one short prompt as for
several (it is launch-bound), so prompts that arrive together pause the batch's decode once, not once each. With
tensor parallelism this runs on rank 0 only: its model and runner calls are relayed to the other ranks (engine.tp),
which keep no scheduler state.

With speculation (`Request.speculate`, up to `speculate` tokens), a step where some sequence would propose is a
verify step instead: each sequence proposes what pays for itself at the runner's measured costs (engine.speculate),
rows without a proposal verify nothing (their one token is the plain step's), and each sequence takes its accepted
tokens and one more, each through the same stop checks as a plain step's token. Whether anyone would propose is
asked before the plain step in flight is collected (one token behind), so that where nobody would, the plain steps
stay pipelined exactly as without speculation; where the host's work on a verify step's tokens outlasts a plain step
on a GPU, a plain step follows each verify step, launched before those tokens are read.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

import torch

from engine.errors import EngineError
from engine.events import Event, Failed, Finished, FinishReason, TextDelta
from engine.model import Chunk
from engine.prefix_cache import PrefixCache
from engine.runner import Row
from engine.sequence import SequenceState
from engine.speculate import Proposer
from engine.tokenizer import Tokenizer

PREFILL_CHUNK = 2048  # new tokens in one prefill pass, over all its sequences


class Scheduler:
    """The sequences in their three queues (waiting for a slot, prefilling, running) and the loop that moves
    them. `model` and `runner` are the engine's (or, on rank 0 of a tensor-parallel world, stand-ins that relay
    each call to every rank)."""

    def __init__(
        self,
        model: Any,
        runner: Any,
        tok: Tokenizer,
        n_slots: int,
        context: int,
        device: torch.device,
        speculate: int = 0,
    ) -> None:
        self.model, self.runner, self.tok = model, runner, tok
        self.context, self.device, self.speculate = context, device, speculate
        self.cache = PrefixCache(n_slots)
        self.waiting: deque[SequenceState] = deque()
        self.prefilling: deque[SequenceState] = deque()
        self.running: list[SequenceState] = []
        self.inflight: list[SequenceState] | None = None  # the sequences of the launched, not yet collected step

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.prefilling or self.running or self.inflight is not None)

    def add(self, seq: SequenceState) -> None:
        if seq.request.speculate and self.speculate:
            seq.proposer = Proposer(seq.ids)
        self.waiting.append(seq)

    def cancel(self, request_id: str) -> list[Event]:
        """End a request now; its slot is free for the next step."""
        for queue in (self.waiting, self.prefilling, self.running):
            for seq in queue:
                if seq.request.id == request_id:
                    return self._finish(seq, "cancelled")
        return []

    def step(self) -> list[Event]:
        """Admit, prefill one pass of chunks, decode one token per running sequence."""
        events: list[Event] = []
        try:
            self._admit()
            if self.prefilling:
                self._prefill(events)
            if self.running or self.inflight is not None:
                self._decode(events)
        except Exception as err:  # a failed step must not take the worker down
            events.extend(self._fail_all(err))
        return events

    def _admit(self) -> None:
        while self.waiting:
            seq = self.waiting[0]
            taken = self.cache.take(seq.ids)
            if taken is None:
                return
            seq.slot, cached = taken
            self.runner.mark_seen(seq.slot, seq.ids)  # may fail (a dead tensor-parallel rank): still queued, it fails
            seq.cached = seq.done = cached
            self.waiting.popleft()
            self.prefilling.append(seq)

    def _prefill(self, events: list[Event]) -> None:
        """One prefill pass over the prompts in line, in order, up to PREFILL_CHUNK tokens: only the last one may
        stop short of its prompt's end (the budget ran out). Each prompt it finishes samples its first token, in
        that order (their logits are the pass's first rows: what tensor parallelism's sample relies on)."""
        budget, batch = PREFILL_CHUNK, []
        for seq in self.prefilling:
            if budget == 0:
                break
            end = min(seq.done + budget, len(seq.ids))
            batch.append((seq, end))
            budget -= end - seq.done
        tokens = torch.tensor([t for seq, end in batch for t in seq.ids[seq.done : end]], device=self.device)
        logits = self.model.prefill_many(tokens, [Chunk(seq.slot, seq.done, end - seq.done) for seq, end in batch])
        for seq, end in batch:
            seq.done = end
        finished = [seq for seq, _ in batch if seq.done == len(seq.ids)]
        if not finished:
            return
        for seq in finished:
            self.prefilling.remove(seq)
            self.running.append(seq)
        first = self.runner.sample(logits[: len(finished)], [seq.row(0) for seq in finished])
        now = time.perf_counter()
        for seq, token in zip(finished, first, strict=True):
            seq.t_first = now
            self._accept(seq, token, events)
        self._collect(events)  # the sample loaded its rows over the inputs a pipelined next step would advance

    def _decode(self, events: list[Event]) -> None:
        """One decode step, pipelined: while the batch stays the same, the next step is launched from the
        device's own outputs before this step's tokens are read, so the host's work (detokenizing, stops,
        events) overlaps the GPU's. A token computed for a sequence that has meanwhile ended is dropped. A step
        where some sequence may propose is a verify step (`_verify`)."""
        if self._verifying():
            self._verify(events)
            return
        batch = list(self.running)
        done = self.inflight
        if done is None:
            self.runner.launch([s.row(s.generated[-1]) for s in batch])
            self.inflight = batch
            return
        same = done == batch
        if same:
            self.runner.launch()
        self.inflight = batch if same else None
        self._take(done, events)
        if self.inflight is None and self.running:
            self.runner.launch([s.row(s.generated[-1]) for s in self.running])
            self.inflight = list(self.running)

    def _collect(self, events: list[Event]) -> None:
        """Collect the plain step in flight, if any: the next step is then launched with rows, not pipelined."""
        if self.inflight is not None:
            done, self.inflight = self.inflight, None
            self._take(done, events)

    def _take(self, done: list[SequenceState], events: list[Event]) -> None:
        """Collect the launched plain step: one token for each of its sequences still running."""
        for seq, token in zip(done, self.runner.collect(), strict=True):
            if seq in self.running:
                seq.steps += 1
                self._accept(seq, token, events)

    def _verifying(self) -> bool:
        """Whether this step verifies proposals: the batch has a verify step and some running sequence would
        propose on the tokens the host has (without the plain step in flight: collecting it would stop the
        pipelining that a step nobody proposes to keeps)."""
        if not any(s.proposer is not None for s in self.running):
            return False
        costs = self.runner.costs(len(self.running))  # [1.0] alone where no verify step runs this batch
        return any(s.proposer is not None and s.proposer.propose(self._room(s), costs) for s in self.running)

    def _room(self, seq: SequenceState) -> int:
        """The most tokens `seq` may propose: within its token budget and the context (the last one must fit)."""
        made = len(seq.generated)
        return min(self.speculate, seq.request.sampling.max_new_tokens - made - 1, self.context - len(seq.ids) - made)

    def _verify(self, events: list[Event]) -> None:
        """A speculative step. The proposals need the tokens before them, so a plain step in flight is collected
        first; where nobody proposes after all (the token collected was not the one guessed), the step is a plain
        one. Where the host's work on a verify step's tokens (their text, stops and events) outlasts a plain step on a
        device it overlaps (`runner.feeds_verify`: a small model on a GPU), the plain step after the verify step is
        launched before its tokens are read, from its outputs on the device, so the device decodes while the host
        takes them, and the next step asks whether to verify one token later; a token it makes for a sequence the
        verify step's tokens ended is dropped."""
        self._collect(events)
        batch = list(self.running)
        if not batch:
            return
        proposals = self._proposals(batch)
        rows = [s.row(s.generated[-1]) for s in batch]
        if not any(proposals):
            self.runner.launch(rows)
            self.inflight = batch
            return
        self.runner.launch_verify(rows, proposals)
        if self._feeds(rows, proposals):  # the next plain step, fed from the verify step's tokens, runs while
            self.runner.launch()  # the host reads them (which the device would otherwise wait out)
            self.inflight = batch
        for seq, proposed, new in zip(batch, proposals, self.runner.collect_verify(), strict=True):
            seq.steps += 1
            if proposed:
                seq.proposer.feedback(len(proposed), len(new) - 1)
            for token in new:
                if seq not in self.running:  # a stop among the accepted tokens: the rest are dropped
                    break
                self._accept(seq, token, events, judged=bool(proposed))

    def _feeds(self, rows: list[Row], proposals: list[list[int]]) -> bool:
        """Whether a plain step follows this verify step before its tokens are read (`runner.feeds_verify`): not where
        a row taking all its proposals and one more would put the plain step's token past the context, whose last
        position the step would overwrite."""
        fits = all(r.position + len(p) + 2 <= self.context for r, p in zip(rows, proposals, strict=True))
        return fits and self.runner.feeds_verify(len(rows))

    def _proposals(self, batch: list[SequenceState]) -> list[list[int]]:
        """Each sequence's proposal: what pays for itself at this batch's verify costs, within its room, cut to
        the batch's verify step."""
        costs = self.runner.costs(len(batch))
        proposals = [s.proposer.propose(self._room(s), costs) if s.proposer is not None else [] for s in batch]
        longest = max(map(len, proposals))
        if longest:
            cut = self.runner.verify_queries(len(batch), longest) - 1
            proposals = [p[:cut] for p in proposals]
        return proposals

    def _accept(self, seq: SequenceState, token: int, events: list[Event], judged: bool = False) -> None:
        """Take one sampled token: stream its text, and finish the sequence if a stop condition holds. `judged`:
        a verify step judged the sequence's proposals, and its feedback counted this token already."""
        seq.generated.append(token)
        if seq.proposer is not None:
            if judged:
                seq.proposer.extend((token,))
            else:
                seq.proposer.observe(token)
        if token in seq.stops:
            events.extend(self._finish(seq, "eot" if token == self.tok.eot_id else "eos"))
            return
        text, hit = seq.stop_strings.feed(seq.decoder.push(token))
        block = False
        if seq.block_end is not None:
            text, block = seq.block_end.feed(text)
        self._emit(seq, text, events)
        if block:
            events.extend(self._finish(seq, "block"))
        elif hit:
            events.extend(self._finish(seq, "stop"))
        elif len(seq.generated) >= seq.request.sampling.max_new_tokens:
            events.extend(self._finish(seq, "length"))
        elif len(seq.ids) + len(seq.generated) >= self.context:
            events.extend(self._finish(seq, "context"))

    def _emit(self, seq: SequenceState, text: str, events: list[Event]) -> None:
        if seq.strip_leading:
            text = text.lstrip()
            seq.strip_leading = not text
        if text:
            seq.text.append(text)
            events.append(TextDelta(seq.request.id, text))

    def _finish(self, seq: SequenceState, reason: FinishReason) -> list[Event]:
        """End a sequence: flush its text, and leave its keys and values in its slot for the prefix cache."""
        events: list[Event] = []
        if reason not in ("stop", "block", "cancelled"):
            tail = seq.stop_strings.feed(seq.decoder.flush())[0] + seq.stop_strings.flush()
            if seq.block_end is not None:
                tail = seq.block_end.feed(tail)[0] + seq.block_end.flush()
            self._emit(seq, tail, events)
        for queue in (self.waiting, self.prefilling):
            if seq in queue:
                queue.remove(seq)
        if seq in self.running:
            self.running.remove(seq)
        if seq.slot >= 0:
            self.cache.release(seq.slot, seq.in_slot(), len(seq.ids))
        events.append(Finished(seq.request.id, reason, "".join(seq.text), seq.stats()))
        return events

    def _fail_all(self, err: Exception) -> list[Event]:
        """After a failed step nothing in the cache can be trusted: end every request and forget the cache."""
        if isinstance(err, torch.OutOfMemoryError):
            message = (
                "out of GPU memory during generation; try a shorter prompt, fewer concurrent sequences or more GPUs"
            )
        elif isinstance(err, EngineError):
            message = str(err)
        else:
            message = f"generation failed: {type(err).__name__}: {err}"
        events: list[Event] = []
        for seq in [*self.waiting, *self.prefilling, *self.running]:
            self._finish(seq, "cancelled")
            events.append(Failed(seq.request.id, message))
        self.cache.forget()
        self.inflight = None
        self.runner.inflight.clear()
        self.runner.verifying = None
        return events
