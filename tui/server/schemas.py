"""The HTTP requests and responses, as pydantic models in OpenAI's shapes (and llama.cpp's for `/infill`).

Requests ignore fields they do not know (clients send many); the ones they know are checked here, so that a bad
value gets a 400 that names it. Sampling fields left out take the cap's defaults (`SamplingParams.for_cap`).

Five fields are this server's own, for clients that know it (`engine.http_client`; others never send them):
`fit` shortens a prompt that outgrows the context as the engine does (`Request.fit`) instead of refusing it, `spm`
infills suffix-first, `speculate` lets the request speculate as far as `serve --speculate` allows
(`Request.speculate`; llama.cpp's `/infill`, an editor's fill, speculates unless it says `false`),
`stop_at_block_end` (completions and `/infill`) ends a code suggestion where the block it started ends
(`Request.stop_at_block_end`; its finish reason is "stop", the engine's own "block"), and `engine_events` puts an
`engine` object on a stream's first chunk of each choice (the prompt's length, the context, what fitting left out)
and on its finishing chunk (the engine's own finish reason, and speculation's figures).
A model card says whose it is in `codellama_tui`: the model's whole `ModelInfo`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from engine.requests import CAPS

FinishReason = Literal["stop", "length"]
MAX_STOPS = 16  # stop strings per request (OpenAI takes 4): each is looked for after every token
_CHECKED = ConfigDict(extra="ignore", allow_inf_nan=False)


class StreamOptions(BaseModel):
    model_config = _CHECKED
    include_usage: bool = False


class Sampling(BaseModel):
    """The sampling fields both OpenAI endpoints share (`top_k` and `repetition_penalty` as vLLM names them)."""

    model_config = _CHECKED
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1, description="0 or -1 disables it")
    repetition_penalty: float | None = Field(None, gt=0)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(1, ge=1, le=8)
    stream: bool = False
    stream_options: StreamOptions | None = None
    fit: bool = False
    speculate: bool = False
    engine_events: bool = False

    @field_validator("stop")
    @classmethod
    def _few_stops(cls, stop: str | list[str] | None) -> str | list[str] | None:
        if isinstance(stop, list) and len(stop) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop strings, got {len(stop)}")
        return stop

    def stops(self) -> tuple[str, ...] | None:
        if self.stop is None:
            return None
        return tuple(s for s in ([self.stop] if isinstance(self.stop, str) else self.stop) if s)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(Sampling):
    prompt: str
    suffix: str | None = None
    spm: bool = False
    stop_at_block_end: bool = False


class TextPart(BaseModel):
    model_config = _CHECKED
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = _CHECKED
    role: str
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class ExtraFile(BaseModel):
    model_config = _CHECKED
    filename: str = ""
    text: str = ""


class InfillRequest(BaseModel):
    """llama.cpp's `/infill` (and `/completion`) fields, as llama.vim and Tabby send them. `n_predict` -1 means
    as long as the context allows; 0 generates nothing."""

    model_config = _CHECKED
    input_prefix: str = ""
    input_suffix: str = ""
    input_extra: list[ExtraFile] = Field(default_factory=list)
    prompt: str = ""
    n_predict: int = Field(-1, ge=-1)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)
    repeat_penalty: float | None = Field(None, gt=0)
    seed: int | None = None
    stop: list[str] = Field(default_factory=list, max_length=MAX_STOPS)
    stream: bool = False
    response_fields: list[str] | None = None
    speculate: bool = True
    stop_at_block_end: bool = False


class TokenizeRequest(BaseModel):
    """`text` (llama.cpp calls it `content`) as `codellama-tui tokenize --cap CAP` reads it: with one `<FILL>` for
    infilling (or give `prefix` and `suffix`), a user message for chat (`system` joins it; or give `messages`)."""

    model_config = _CHECKED
    text: str | None = None
    content: str | None = None
    prefix: str | None = None
    suffix: str | None = None
    cap: Literal[CAPS] = "completion"  # type: ignore[valid-type]
    system: str | None = None
    messages: list[Message] | None = None
    spm: bool = False


# ---- responses


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: dict[str, int] | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: FinishReason | None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ChatMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatMessage
    logprobs: None = None
    finish_reason: FinishReason | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: Delta
    logprobs: None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class EngineInfo(BaseModel):
    """`engine.events.ModelInfo` on the wire: what a client of this server knows about its model."""

    name: str
    can_infill: bool
    can_tokenize: bool
    context: int | None
    flavour: str | None
    device: str | None
    dtype: str | None
    tp: int | None
    vocab_size: int | None
    is_demo: bool


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "codellama-tui"
    max_model_len: int | None = None
    codellama_tui: EngineInfo | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
