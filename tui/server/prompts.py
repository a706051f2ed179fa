"""What each endpoint's fields mean as engine requests: which cap, which text, which sampling.

- `/v1/completions`: `prompt` continued; with `suffix`, CodeLlama infilling (Meta's exact ids, never a text
  template; `spm` for suffix-first). A prompt written in CodeLlama's text FIM template,
  `<PRE> {prefix} <SUF>{suffix} <MID>` (what Continue's autocomplete and Tabby's `prompt_template` send), is
  infilling too: the template names the special pieces, which text alone would only spell out.
- `/v1/chat/completions`: the whole conversation, in the checkpoint's own dialog format (`engine.prompts`).
- Both take `fit` (`Request.fit`): a prompt that outgrows the context is shortened instead of refused, and
  `speculate` (`Request.speculate`); `/v1/completions` and `/infill` take `stop_at_block_end`
  (`Request.stop_at_block_end`).
- `/infill` (llama.cpp): `input_extra` (the other files) goes first, then `input_prefix` and `prompt` (the
  cursor's line up to the cursor) as the prefix, `input_suffix` as the suffix; it speculates unless told not to
  (an editor's fill is grounded in its file).
"""

from __future__ import annotations

from dataclasses import replace

from engine.events import ModelInfo
from engine.requests import ChatMessage, Request, SamplingParams, new_request_id
from tui.server.errors import ApiError
from tui.server.schemas import ChatCompletionRequest, CompletionRequest, InfillRequest, Message, Sampling

FIM_PRE, FIM_SUF, FIM_MID = "<PRE> ", " <SUF>", " <MID>"
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def completion_requests(body: CompletionRequest, info: ModelInfo) -> list[Request]:
    if body.suffix is not None:
        prefix, suffix = body.prompt, body.suffix
    else:
        split = split_fim_template(body.prompt)
        if split is None:
            return _choices(
                Request("completion", text=body.prompt, stop_at_block_end=body.stop_at_block_end), body, info
            )
        prefix, suffix = split
    if not info.can_infill:
        raise ApiError(
            400,
            f"{info.name} cannot infill (34B and -Python models have no infilling pieces); "
            "send the prompt without a suffix",
            param="suffix",
            code="infilling_unsupported",
        )
    request = Request("infilling", prefix=prefix, suffix=suffix, suffix_first=body.spm)
    return _choices(replace(request, stop_at_block_end=body.stop_at_block_end), body, info)


def chat_requests(body: ChatCompletionRequest, info: ModelInfo) -> list[Request]:
    messages = tuple(_message(i, m) for i, m in enumerate(body.messages))
    return _choices(Request("chat", messages=messages), body, info)


def infill_request(body: InfillRequest, info: ModelInfo, *, infilling: bool = True) -> Request:
    """llama.cpp's `/infill`, or with `infilling=False` its `/completion` (whose `prompt` may be in the FIM
    template, as Tabby's llama.cpp backend sends it)."""
    if infilling:
        extra = "".join(_extra_file(f.filename, f.text) for f in body.input_extra)
        request = Request("infilling", prefix=extra + body.input_prefix + body.prompt, suffix=body.input_suffix)
    elif (split := split_fim_template(body.prompt)) is not None:
        request = Request("infilling", prefix=split[0], suffix=split[1])
    else:
        request = Request("completion", text=body.prompt)
    if request.cap == "infilling" and not info.can_infill:
        raise ApiError(
            400,
            f"{info.name} cannot infill (34B and -Python models have no infilling pieces)",
            code="infilling_unsupported",
        )
    sampling = SamplingParams.for_cap(
        request.cap,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=None if body.top_k is None else max(body.top_k, 0),
        repetition_penalty=body.repeat_penalty,
        max_new_tokens=body.n_predict if body.n_predict > 0 else _whole(info),
        seed=None if body.seed is None or body.seed < 0 else body.seed,
        stop=tuple(s for s in body.stop if s),
    )
    return replace(request, sampling=sampling, speculate=body.speculate, stop_at_block_end=body.stop_at_block_end)


def split_fim_template(prompt: str) -> tuple[str, str] | None:
    """(prefix, suffix) of a prompt written exactly as `<PRE> {prefix} <SUF>{suffix} <MID>`, else None."""
    if not (prompt.startswith(FIM_PRE) and prompt.endswith(FIM_MID)) or prompt.count(FIM_SUF) != 1:
        return None
    prefix, suffix = prompt[len(FIM_PRE) : -len(FIM_MID)].split(FIM_SUF)
    return prefix, suffix


def _whole(info: ModelInfo) -> int:
    """A limit that lets generation run to the context's end."""
    return info.context or SamplingParams().max_new_tokens


def _extra_file(filename: str, text: str) -> str:
    """Another file's text as context above the prefix, under a line that names it."""
    header = f"--- {filename} ---\n" if filename else ""
    return header + text + ("" if text.endswith("\n") else "\n") + "\n"


def _message(index: int, message: Message) -> ChatMessage:
    role = ROLES.get(message.role)
    if role is None:
        raise ApiError(
            400,
            f"messages.{index}.role: {message.role!r} is not a role this model knows; use system, user or assistant",
            param=f"messages.{index}.role",
        )
    return ChatMessage(role, message.text())  # type: ignore[arg-type]


def _choices(request: Request, body: Sampling, info: ModelInfo) -> list[Request]:
    """The request's `n` sequences, each with its own id; with a seed, choice i draws from seed + i."""
    limit = getattr(body, "max_completion_tokens", None) or body.max_tokens
    if limit is None:  # OpenAI's default for completions is 16 tokens; a chat answer runs to its end
        limit = 16 if request.cap != "chat" else _whole(info)
    sampling = SamplingParams.for_cap(
        request.cap,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=None if body.top_k is None else max(body.top_k, 0),
        repetition_penalty=body.repetition_penalty,
        max_new_tokens=limit,
        seed=body.seed,
        stop=body.stops(),
    )
    base = new_request_id()
    return [
        replace(
            request,
            id=f"{base}-{i}",
            fit=body.fit,
            speculate=body.speculate,
            sampling=replace(sampling, seed=None if body.seed is None else body.seed + i),
        )
        for i in range(body.n)
    ]
