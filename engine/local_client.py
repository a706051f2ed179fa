"""The engine in this process: a worker thread that owns it, behind the client contract (`engine.client`).

Commands go to the worker through a queue; the worker delivers every event from its own thread. It alone
touches the engine (and, with tensor parallelism, drives the other ranks), so nothing here takes a lock on
engine state. No thread dies silently: a fault of one request fails that request, a fault of the loop itself fails
every open request and leaves the worker refusing new ones with the reason, and when the worker ends (closed, or
anything else) no request is left waiting. Importing this module does not import torch: the worker imports the
engine when it loads.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from engine.client import BaseClient, EventSink
from engine.errors import EngineError
from engine.events import Failed, LoadFailed, Loading, Ready
from engine.prompts import build_prompt
from engine.requests import EngineSpec, Request

if TYPE_CHECKING:
    from engine.engine import Engine
    from engine.tokenizer import Tokenizer


@dataclass(frozen=True)
class _Submit:
    request: Request


@dataclass(frozen=True)
class _Cancel:
    request_id: str


@dataclass(frozen=True)
class _Call:
    fn: Callable[[Engine], Any]
    future: Future


class _Close:
    pass


class LocalClient(BaseClient):
    """Loads the engine of `spec` on a worker thread (at `start()`) and serves requests there."""

    def __init__(
        self, spec: EngineSpec, on_event: EventSink | None = None, load: Callable[..., Engine] | None = None
    ) -> None:
        """`load(spec, progress)` builds the engine on the worker (default `Engine.load`; `bench-serve --step-ms`
        gives a stand-in's)."""
        super().__init__(on_event)
        self.spec, self._load_engine = spec, load
        self._commands: queue.Queue[object] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="engine-worker", daemon=True)
        self._tok: Tokenizer | None = None
        self._halted: str | None = None  # why the worker stopped serving after a fault of its own loop

    def _open(self) -> None:
        self._thread.start()

    def _send(self, request: Request) -> None:
        self._commands.put(_Submit(request))

    def _send_cancel(self, request_id: str) -> None:
        self._commands.put(_Cancel(request_id))

    def call(self, fn: Callable[[Engine], Any], timeout: float | None = None) -> Any:
        """Run `fn(engine)` on the worker thread between steps and return its result (or raise its error): for
        measuring the engine itself in a process that serves it (`bench-serve`). Call it while no request runs: it
        may use any slot, so the prefix cache forgets what the idle slots held."""
        future: Future = Future()
        self._commands.put(_Call(fn, future))
        return future.result(timeout)

    def _tokenize(self, request: Request) -> list[int]:
        """On the caller's thread: the tokenizer is read-only once loaded."""
        assert self._tok is not None
        return build_prompt(self._tok, request)

    def _shut(self, timeout: float) -> None:
        """Stop the worker (and with tensor parallelism, every rank)."""
        if self._thread.is_alive():
            self._commands.put(_Close())
            self._thread.join(timeout)

    def _run(self) -> None:
        try:
            engine = self._load()
            while True:
                try:
                    return self._serve(engine)
                except Exception as err:  # a fault of the loop itself: no thread dies silently
                    self._halt(engine, err)
                    engine = None
        except Exception as err:  # the caller's `on_event` failed on Ready (its stderr closed, say)
            self._halt(None, err)
        finally:  # whatever ends this thread, no request waits for it
            self.stopped(self._halted or "the engine was closed")

    def _serve(self, engine: Engine | None) -> None:
        closed = False
        while not closed:
            busy = engine is not None and engine.busy
            try:
                command = self._commands.get(block=not busy)
            except queue.Empty:
                command = None
            while command is not None:
                if isinstance(command, _Close):
                    closed = True
                    break
                self._handle(engine, command)
                try:
                    command = self._commands.get_nowait()
                except queue.Empty:
                    command = None
            if not closed and engine is not None and engine.busy:
                for event in engine.step():
                    self.deliver(event)
        if engine is not None:
            engine.close()

    def _halt(self, engine: Engine | None, err: Exception) -> None:
        """The loop failed outside any one request: fail every request in flight, then refuse new ones with why."""
        self._halted = f"the engine stopped: {_reason(err)}"
        if engine is not None:
            with contextlib.suppress(Exception):
                engine.close()
        self.fail_open(self._halted)

    def _load(self) -> Engine | None:
        start = time.perf_counter()
        try:
            from engine.engine import Engine  # imports torch: only ever on this thread

            load = self._load_engine or Engine.load
            engine = load(self.spec, lambda f, s: self.deliver(Loading(f, s)))
        except EngineError as err:
            failed = LoadFailed(str(err), err.fields)
        except Exception as err:  # an unexpected failure must still reach the user as one line
            failed = LoadFailed(f"could not load the model: {type(err).__name__}: {err}")
        else:
            self._tok = engine.tok
            self.deliver(Ready(engine.info, time.perf_counter() - start))
            return engine
        self.deliver(failed)
        return None

    def _handle(self, engine: Engine | None, command: object) -> None:
        if isinstance(command, _Submit):
            if engine is None:
                self.deliver(Failed(command.request.id, self._halted or self.load_error or "no model is loaded"))
                return
            try:
                events = engine.add(command.request)
            except Exception as err:  # an unforeseen fault of one request fails that request, not the worker
                events = [Failed(command.request.id, f"the request failed: {_reason(err)}")]
            for event in events:
                self.deliver(event)
        elif isinstance(command, _Cancel) and engine is not None:
            for event in engine.cancel(command.request_id):
                self.deliver(event)
        elif isinstance(command, _Call):
            if engine is None:
                command.future.set_exception(EngineError(self.load_error or "no model is loaded"))
                return
            try:
                command.future.set_result(command.fn(engine))
            except Exception as err:  # the caller's to report
                command.future.set_exception(err)
            finally:
                engine.scheduler.cache.forget()


def _reason(err: Exception) -> str:
    """An unexpected exception as the one line a user sees."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__
