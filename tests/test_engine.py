"""Conformance of the engine with `transformers.LlamaForCausalLM` on the same tiny random weights."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from engine.engine import Engine
from engine.events import Failed, Finished, Started, TextClipped, TextDelta, TurnsDropped
from engine.prompts import Dialog, chat_ids, step_dialog_ids
from engine.requests import ChatMessage, EngineSpec, Request, SamplingParams
from tui.conversation import Conversation

transformers = pytest.importorskip("transformers")

GREEDY = SamplingParams(temperature=0, max_new_tokens=64)
PROMPT = "def fibonacci(n):\n    "


def load(path: Path, **spec: object) -> Engine:
    return Engine.load(EngineSpec(model=str(path), device="cpu", dtype="float32", **{"max_batch": 2, **spec}))


def hf_model(path: Path):
    return transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def run(engine: Engine, *requests: Request) -> dict[str, list]:
    events: dict[str, list] = {r.id: [] for r in requests}
    for r in requests:
        for e in engine.add(r):
            events[r.id].append(e)
    while engine.busy:
        for e in engine.step():
            events[e.request_id].append(e)
    return events


def hf_greedy(model, ids: list[int], n: int, stop: int | None = None) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=stop, pad_token_id=0)
    return out[0, len(ids) :].tolist()


@pytest.fixture(params=["tiny_model_dir", "tiny_gqa_dir"])
def checkpoint(request) -> Path:
    return request.getfixturevalue(request.param)


def test_prefill_logits_match_transformers(checkpoint: Path) -> None:
    engine, ref = load(checkpoint), hf_model(checkpoint)
    ids = engine.prompt_ids(Request("completion", text=PROMPT * 3))
    with torch.no_grad():
        expected = ref(torch.tensor([ids])).logits[0]
        got = engine.model.prefill(torch.tensor(ids), slot=0, start=0, all_logits=True)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() < 1e-4


def test_decode_logits_match_transformers(checkpoint: Path) -> None:
    """Prefill a prompt, then decode the next tokens one by one in a batch of two slots."""
    engine, ref = load(checkpoint), hf_model(checkpoint)
    ids = engine.prompt_ids(Request("completion", text=PROMPT))
    follow = [450, 1243, 338, 263]
    with torch.no_grad():
        expected = ref(torch.tensor([ids + follow])).logits[0, len(ids) - 1 :]
        engine.model.prefill(torch.tensor(ids), slot=1, start=0)
        engine.model.prefill(torch.tensor(ids[:3]), slot=0, start=0)
        for i, token in enumerate(follow):
            pos = len(ids) + i
            logits = engine.model.decode(torch.tensor([7, token]), torch.tensor([2 + i, pos]), torch.tensor([0, 1]))
            assert (logits[1] - expected[i + 1]).abs().max().item() < 1e-4


def test_64_greedy_tokens_match_transformers(checkpoint: Path) -> None:
    engine, ref = load(checkpoint), hf_model(checkpoint)
    request = Request("completion", text=PROMPT, sampling=GREEDY)
    ids = engine.prompt_ids(request)
    expected = hf_greedy(ref, ids, 64, stop=2)
    events = run(engine, request)[request.id]
    finished = events[-1]
    assert isinstance(finished, Finished)
    assert finished.stats.new_tokens == len(expected)
    assert finished.text == engine.tok.decode(expected)
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == finished.text


def test_batched_requests_match_single_runs(tiny_gqa_dir: Path) -> None:
    """Two sequences decoded together give what each gives alone (continuous batching is invisible)."""
    engine = load(tiny_gqa_dir)
    a = Request("completion", text=PROMPT, sampling=GREEDY)
    b = Request("completion", text="import os\nimport sys\n\n\ndef main(", sampling=GREEDY)
    together = run(engine, a, b)
    alone_a = run(engine, Request("completion", text=PROMPT, sampling=GREEDY))
    alone_b = run(engine, Request("completion", text=b.text, sampling=GREEDY))
    assert together[a.id][-1].text == next(iter(alone_a.values()))[-1].text
    assert together[b.id][-1].text == next(iter(alone_b.values()))[-1].text


def test_a_second_chat_turn_prefills_only_its_new_part_and_matches_transformers(checkpoint: Path, monkeypatch) -> None:
    """The second turn arrives as the whole conversation; the first turn's keys and values are still in its slot,
    so only what follows them is prefilled (counted), and the answer is transformers' on the whole prompt, as it is
    without the cache."""
    engine, ref = load(checkpoint), hf_model(checkpoint)
    prefilled: list[int] = []
    original = engine.model.prefill_many

    def counting_prefill(tokens, chunks, all_logits=False):
        prefilled.append(len(tokens))
        return original(tokens, chunks, all_logits)

    monkeypatch.setattr(engine.model, "prefill_many", counting_prefill)
    sampling = SamplingParams(temperature=0, max_new_tokens=24)
    chat = Conversation("Answer in Python")
    first = chat.request("Write a function that adds two numbers.", sampling)
    answer = run(engine, first)[first.id][-1]
    assert isinstance(answer, Finished) and answer.stats.cached_tokens == 0
    chat.answered(first, answer.text)
    second = chat.request("Now make it multiply.", sampling)
    prefilled.clear()
    events = run(engine, second)[second.id]
    full, before = chat_ids(engine.tok, second.messages), chat_ids(engine.tok, first.messages)
    assert second.messages[2] == ChatMessage("assistant", answer.text)
    started, finished = next(e for e in events if isinstance(e, Started)), events[-1]
    assert started.prompt_tokens == finished.stats.prompt_tokens == len(full)
    assert finished.stats.cached_tokens >= len(before)  # the whole first prompt, and what of the answer re-encodes
    assert sum(prefilled) == finished.stats.prefilled_tokens == len(full) - finished.stats.cached_tokens
    assert finished.text == engine.tok.decode(hf_greedy(ref, full, 24, stop=2)).strip()
    engine.scheduler.cache.forget()
    again = run(engine, replace(second, id="without the cache"))["without the cache"][-1]
    assert again.stats.cached_tokens == 0 and again.text == finished.text


def test_the_prefix_cache_takes_free_slots_first_then_evicts_the_least_recently_used(tiny_model_dir: Path) -> None:
    """Two slots, three conversations: the second takes the empty slot although the first one's shares its opening
    tags; the third evicts the older of the two (keeping the tags it shares), so the second conversation's next turn
    still finds its cache and the first's does not."""
    engine = load(tiny_model_dir, max_batch=2)
    sampling = SamplingParams(temperature=0, max_new_tokens=8)
    chats = [Conversation(system) for system in ("Answer in Python.", "Be brief.", "You write Rust.")]
    opened = []
    for chat in chats:
        request = chat.request("Write a function that adds two numbers.", sampling)
        finished = run(engine, request)[request.id][-1]
        opened.append(finished.stats.cached_tokens)
        chat.answered(request, finished.text)
    assert opened[0] == opened[1] == 0 and 0 < opened[2] < 10  # bos, `[INST] <<SYS>>` and the newline
    turn = {}
    for i in (1, 0):
        request = chats[i].request("Now make it multiply.", sampling)
        turn[i] = run(engine, request)[request.id][-1].stats.cached_tokens
        assert engine.scheduler.cache.in_use() == 0
    asked = chats[1].request("Write a function that adds two numbers.", sampling)
    assert turn[1] >= len(chat_ids(engine.tok, asked.messages[:2])) and turn[0] < 10


def script_tokens(engine: Engine, script: list[int], monkeypatch) -> None:
    """Make the engine's runner "sample" `script`, one token per row and step, instead of running the model."""
    tokens = iter(script)

    class ScriptedRunner:
        seen = engine.runner.seen
        inflight: list[list[int]] = []

        def launch(self, rows=None):
            self.n = len(rows) if rows is not None else self.n
            self.inflight.append([next(tokens) for _ in range(self.n)])

        def collect(self):
            return self.inflight.pop(0)

        def sample(self, logits, rows):
            return [next(tokens) for _ in rows]

        def mark_seen(self, slot, ids):
            pass

    monkeypatch.setattr(engine.scheduler, "runner", ScriptedRunner())


def test_a_70b_instruct_checkpoint_chats_in_its_own_format_and_stops_at_step(tiny_70b_instruct_dir, monkeypatch):
    engine = load(tiny_70b_instruct_dir)
    request = Conversation("Be brief").request("Hi", SamplingParams(max_new_tokens=50))
    assert engine.prompt_ids(request) == step_dialog_ids(engine.tok, Dialog.of(request.messages))
    script_tokens(
        engine, engine.tok.encode("Hello!") + [engine.tok.step_id] + engine.tok.encode(" Source") * 4, monkeypatch
    )
    finished = run(engine, request)[request.id][-1]
    assert (finished.reason, finished.text, finished.stats.new_tokens) == ("eos", "Hello!", 3)


def test_multibyte_stream_equals_one_shot_decode(tiny_model_dir: Path, monkeypatch) -> None:
    """Byte-fallback pieces must never reach the stream as broken characters."""
    engine = load(tiny_model_dir)
    text = " naïve café → 日本語 😀🎉 done"
    script = engine.tok.encode(text)
    assert any(len(engine.tok.token_bytes(i)) == 1 and engine.tok.token_bytes(i)[0] >= 0x80 for i in script)
    script_tokens(engine, script + [engine.tok.eos_id] * 4, monkeypatch)  # the pipeline may run a step past the end
    request = Request("completion", text="x", sampling=SamplingParams(max_new_tokens=200))
    events = run(engine, request)[request.id]
    deltas = [e.text for e in events if isinstance(e, TextDelta)]
    assert "".join(deltas) == engine.tok.decode(script) == events[-1].text
    assert all("\ufffd" not in d for d in deltas)
    assert events[-1].reason == "eos"


def test_cancel_stops_within_one_step_and_frees_the_slot(tiny_model_dir: Path) -> None:
    engine = load(tiny_model_dir, max_batch=1)
    request = Request("completion", text=PROMPT, sampling=SamplingParams(temperature=0, max_new_tokens=500))
    engine.add(request)
    engine.step()
    engine.step()
    generated = len(engine.scheduler.running[0].generated)
    (finished,) = engine.cancel(request.id)
    assert finished.reason == "cancelled" and finished.stats.new_tokens == generated < 500
    assert engine.scheduler.cache.in_use() == 0
    assert engine.step() == []  # drains the step that was already launched, emitting nothing for it
    assert not engine.busy


def test_stop_string_and_max_tokens(tiny_model_dir: Path) -> None:
    engine = load(tiny_model_dir)
    free = run(engine, Request("completion", text=PROMPT, sampling=SamplingParams(temperature=0, max_new_tokens=30)))
    text = next(iter(free.values()))[-1].text
    stop = text[5:8]
    request = Request(
        "completion", text=PROMPT, sampling=SamplingParams(temperature=0, max_new_tokens=30, stop=(stop,))
    )
    finished = run(engine, request)[request.id][-1]
    assert finished.reason == "stop" and finished.text == text[: text.index(stop)]
    request = Request("completion", text=PROMPT, sampling=SamplingParams(temperature=0, max_new_tokens=5))
    assert run(engine, request)[request.id][-1].reason == "length"


def test_seeded_sampling_is_reproducible(tiny_model_dir: Path) -> None:
    engine = load(tiny_model_dir)
    sampling = SamplingParams(temperature=0.8, top_p=0.95, top_k=40, seed=1234, max_new_tokens=20)
    texts = [
        next(iter(run(engine, Request("completion", text=PROMPT, sampling=sampling)).values()))[-1].text for _ in "ab"
    ]
    other = SamplingParams(temperature=0.8, top_p=0.95, top_k=40, seed=99, max_new_tokens=20)
    assert texts[0] == texts[1]
    assert next(iter(run(engine, Request("completion", text=PROMPT, sampling=other)).values()))[-1].text != texts[0]


def test_context_end_and_overlong_prompt(tiny_model_dir: Path) -> None:
    engine = load(tiny_model_dir, max_seq_len=24)
    request = Request("completion", text="a b c d e f g h i j k l m n o p q r s t u v w x y z", sampling=GREEDY)
    (failed,) = run(engine, request)[request.id]
    assert isinstance(failed, Failed) and "too many" in failed.message and "context holds 24" in failed.message
    request = Request("completion", text="x = 1\n" * 30, fit=True, sampling=GREEDY)  # an editor's whole file
    clipped, started, *_, finished = run(engine, request)[request.id]
    assert isinstance(clipped, TextClipped) and clipped.before > 0 and clipped.after == 0
    assert isinstance(started, Started) and started.prompt_tokens <= 24 - 6 and isinstance(finished, Finished)
    request = Request("completion", text="def f(", sampling=GREEDY)
    finished = run(engine, request)[request.id][-1]
    assert finished.reason == "context" and finished.stats.prompt_tokens + finished.stats.new_tokens == 24


def test_a_fit_chat_drops_its_oldest_turns_when_the_context_is_full(tiny_model_dir: Path) -> None:
    """The prompt keeps room for the answer: the oldest exchanges go, the system instruction stays, and the
    conversation (which forgets what went) never grows past the context."""
    engine = load(tiny_model_dir, max_seq_len=160)
    sampling = SamplingParams(temperature=0, max_new_tokens=16)
    chat, dropped = Conversation("Be brief"), []
    for i in range(8):
        request = chat.request(f"Question number {i}: what does this do?", sampling)
        events = run(engine, request)[request.id]
        assert isinstance(events[-1], Finished)
        for event in events:
            if isinstance(event, TurnsDropped):
                chat.drop(event.count)
                dropped.append(event.count)
            if isinstance(event, Started):
                assert event.prompt_tokens <= 160 - 16
        chat.answered(request, events[-1].text)
    assert dropped and len(chat.exchanges) < 8
    chat.exchanges = [(f"Question {i}?", "An answer of a few words.") for i in range(12)]
    whole = replace(chat.request("And this one?", sampling), fit=False)  # as an HTTP client sends it
    (failed,) = run(engine, whole)[whole.id]
    assert isinstance(failed, Failed) and "too many" in failed.message


def test_bin_fallback_and_sharded_safetensors_load_the_same_weights(tiny_gqa_dir: Path, tmp_path: Path) -> None:
    assert len(list(tiny_gqa_dir.glob("*.safetensors"))) == 3
    ref = hf_model(tiny_gqa_dir)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    torch.save(ref.state_dict(), bin_dir / "pytorch_model.bin")
    for f in tiny_gqa_dir.iterdir():
        if not f.name.startswith("model"):
            shutil.copy(f, bin_dir / f.name)
    a, b = load(tiny_gqa_dir), load(bin_dir)
    for (name, pa), (_, pb) in zip(a.model.named_parameters(), b.model.named_parameters(), strict=True):
        assert torch.equal(pa, pb), name


def test_cpu_float32_projections_are_column_major(tiny_gqa_dir: Path) -> None:
    """The layout MKL's matrix-vector product reads fastest, with the values and shapes of the checkpoint."""
    engine, ref = load(tiny_gqa_dir), hf_model(tiny_gqa_dir)
    layer, model = engine.model.layers[0], engine.model
    for w in (layer.attention.wqkv, layer.attention.wo, layer.feed_forward.w13, layer.feed_forward.w2, model.output):
        assert w.weight.t().is_contiguous()
    assert model.tok_embeddings.is_contiguous()  # looked up by row
    assert torch.equal(layer.feed_forward.w2.weight, ref.model.layers[0].mlp.down_proj.weight)
    bf16 = Engine.load(EngineSpec(model=str(tiny_gqa_dir), device="cpu", dtype="bfloat16", max_batch=2))
    assert bf16.model.layers[0].attention.wqkv.weight.is_contiguous()  # MKL's bfloat16 product wants rows


def test_more_requests_than_slots_wait_their_turn(tiny_model_dir: Path) -> None:
    """With one slot, a second request queues, then runs when the first retires; both give their own answer."""
    engine = load(tiny_model_dir, max_batch=1)
    a = Request("completion", text=PROMPT, sampling=SamplingParams(temperature=0, max_new_tokens=8))
    b = Request("completion", text="class Stack:\n", sampling=SamplingParams(temperature=0, max_new_tokens=8))
    events: dict[int, list] = {a.id: engine.add(a), b.id: engine.add(b)}
    engine.step()
    scheduler = engine.scheduler
    assert [s.request.id for s in scheduler.running] == [a.id] and [s.request.id for s in scheduler.waiting] == [b.id]
    while engine.busy:
        for e in engine.step():
            events[e.request_id].append(e)
    for request in (a, b):
        alone = run(engine, Request("completion", text=request.text, sampling=request.sampling))
        assert events[request.id][-1].text == next(iter(alone.values()))[-1].text
    assert scheduler.cache.in_use() == 0


def test_out_of_memory_at_load_names_what_to_try(tiny_model_dir: Path, monkeypatch) -> None:
    from engine.errors import OutOfMemoryError
    from engine.model import Llama

    def no_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(Llama, "setup_cache", no_memory)
    with pytest.raises(OutOfMemoryError) as err:
        load(tiny_model_dir)
    message = str(err.value)
    assert "fewer concurrent sequences" in message and "tensor parallelism" in message and "\n" not in message
    assert "--" not in message and set(err.value.fields) == {"max_batch", "max_seq_len", "dtype", "tp"}
