"""Errors the engine raises for bad input: each carries a one-line message meant for the user."""


class EngineError(Exception):
    """A problem the user can fix; `str(err)` is a complete one-line message. It names no command-line options, since
    a server's caller reads it too; `fields` names the `EngineSpec` settings that would fix it, for a front end to
    point at its own options."""

    def __init__(self, message: str, *, fields: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.fields = fields


class CheckpointError(EngineError):
    """The model directory is missing, incomplete, broken or not a Llama checkpoint."""


class PromptError(EngineError):
    """The prompt cannot be built: wrong number of <FILL> markers, reserved words, too long..."""


class CapabilityError(EngineError):
    """The model cannot do what was asked (infilling without FIM pieces, chat on a base model...)."""


class OutOfMemoryError(EngineError):
    """The device ran out of memory; the message says what did not fit and what to try."""

    FIELDS = ("max_batch", "max_seq_len", "dtype", "tp")  # what to try, as `EngineSpec` settings
