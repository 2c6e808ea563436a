"""Generation for the server: requests queue for one worker thread that runs one `generate()` at a time.

A request never shares a cache with another, and the per-layer state of a patched method (a decode refresh schedule)
belongs to one sequence at a time. Each request is a `Generation`: it is also the StoppingCriteria of its own
generate() call, which sees every new token as soon as it exists, decodes it incrementally, cuts the text at a stop
string, hands the new text to the event loop and ends the call when the client has gone.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

logger = logging.getLogger("hf_longattn.serve")


class BadRequest(ValueError):
    """A request the server cannot serve as asked: answered with `status` and the message, nothing is generated."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.code = message, param, status, code


def context_limit(model) -> int | None:
    """Most tokens (prompt + completion) one sequence may hold: the model's trained context (max_position_embeddings),
    or no limit when the patched method reads past it by design (it declares `extends_context`, as LongHeads does)."""
    from ..eval.cli import max_positions
    from ..models import decoder_attention_modules
    from ..patch import is_patched

    trained = max_positions(model.config)
    if is_patched(model) and getattr(decoder_attention_modules(model)[0].hf_longattn_runner.method,
                                     "extends_context", False):
        return None
    return trained


@dataclass
class Sampling:
    max_new_tokens: int
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    ignore_eos: bool = False  # generate exactly max_new_tokens (benchmarks)

    def generate_kwargs(self) -> dict:
        kwargs = {"max_new_tokens": self.max_new_tokens, "do_sample": self.temperature > 0}
        if self.temperature > 0:
            kwargs.update(temperature=self.temperature, top_p=self.top_p, top_k=0)  # OpenAI has no top-k
        if self.ignore_eos:
            kwargs["min_new_tokens"] = self.max_new_tokens
        return kwargs


class Generation(StoppingCriteria):
    """One request: its prompt, sampling, the text produced so far and its timing."""

    def __init__(self, engine: "Engine", prompt_ids: list[int], sampling: Sampling, label: str):
        self.engine, self.prompt_ids, self.sampling, self.label = engine, prompt_ids, sampling, label
        self.tokens: list[int] = []
        self.finish_reason: str | None = None  # "stop", "length" or "cancelled"
        self.error: BaseException | None = None
        self.cancelled = False
        self.received_at = time.perf_counter()
        self.started_at = self.first_token_at = self.finished_at = None
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue = asyncio.Queue()
        self._prefix_offset = self._read_offset = 0  # incremental detokenization
        self._text = ""  # decoded so far
        self._sent = 0  # characters of _text handed out (the rest may be the start of a stop string)
        self._stop_found = False

    # ---- the event loop's side
    def cancel(self) -> None:
        """The client is gone: stop at the next token (or never start)."""
        self.cancelled = True

    async def text_deltas(self):
        """The new text as it is generated; raises what generation raised."""
        while (delta := await self._queue.get()) is not None:
            yield delta
        if self.error is not None:
            raise self.error

    def timing(self) -> dict:
        n = len(self.tokens)
        prefill = self.first_token_at - self.started_at if self.first_token_at else None
        decode = self.finished_at - self.first_token_at if self.first_token_at and n > 1 else None
        return {
            "queue_s": _round(self.started_at - self.received_at if self.started_at else None),
            "time_to_first_token_s": _round(self.first_token_at - self.received_at if self.first_token_at else None),
            "prefill_tokens_per_s": _round(len(self.prompt_ids) / prefill if prefill else None, 1),
            "decode_tokens_per_s": _round((n - 1) / decode if decode else None, 1),
            "total_s": _round(self.finished_at - self.received_at if self.finished_at else None),
        }

    def usage(self) -> dict:
        return {"prompt_tokens": len(self.prompt_ids), "completion_tokens": len(self.tokens),
                "total_tokens": len(self.prompt_ids) + len(self.tokens)}

    # ---- the worker thread's side
    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.BoolTensor:
        """generate() calls this once per new token, right after the token is chosen."""
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        token = int(input_ids[0, -1])
        self.tokens.append(token)
        if token not in self.engine.eos_token_ids:
            self._add_text(self._decode_new())
        stop = self.cancelled or self._stop_found
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)

    def _decode_new(self, final: bool = False) -> str:
        """Text of the newest token(s): decode a short window twice so that merged or partial characters come out
        right (a token may end inside a UTF-8 character; a leading space depends on the token before)."""
        decode = self.engine.tokenizer.decode
        before = decode(self.tokens[self._prefix_offset:self._read_offset], skip_special_tokens=True)
        after = decode(self.tokens[self._prefix_offset:], skip_special_tokens=True)
        if not final and (len(after) <= len(before) or after.endswith("\ufffd")):
            return ""  # wait for the rest of the character
        self._prefix_offset, self._read_offset = self._read_offset, len(self.tokens)
        return after[len(before):]

    def _add_text(self, new: str) -> None:
        if not new:
            return
        longest = max((len(s) for s in self.sampling.stop), default=0)
        searched_from = max(0, len(self._text) - longest)
        self._text += new
        cuts = [i for s in self.sampling.stop if (i := self._text.find(s, searched_from)) >= 0]
        if cuts:
            self._text = self._text[:min(cuts)]
            self._stop_found = True
            self._send(len(self._text))
        else:  # hold back what may be the beginning of a stop string
            stops = self.sampling.stop
            held = max((k for s in stops for k in range(1, len(s)) if self._text.endswith(s[:k])), default=0)
            self._send(len(self._text) - held)

    def _send(self, upto: int) -> None:
        if upto > self._sent:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, self._text[self._sent:upto])
            self._sent = upto

    def _finish(self, error: BaseException | None = None) -> None:
        self.finished_at = time.perf_counter()
        self.error = error
        ended = bool(self.tokens) and self.tokens[-1] in self.engine.eos_token_ids
        self.finish_reason = ("cancelled" if self.cancelled else "stop" if self._stop_found or ended else "length")
        if error is None and not self.cancelled:
            if not self._stop_found:
                self._add_text(self._decode_new(final=True))  # a character still incomplete at the end
            self._send(len(self._text))  # and what was held back for a stop string that never came
        self._loop.call_soon_threadsafe(self._queue.put_nowait, None)


class Engine:
    """Owns the model: requests wait in a first-in first-out queue, one generate() runs at a time."""

    def __init__(self, model, tokenizer, name: str, max_context: int | None = None, default_max_tokens: int = 256):
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.max_context = max_context if max_context is not None else context_limit(model)
        self.default_max_tokens = default_max_tokens
        eos = model.generation_config.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        self.eos_token_ids = frozenset(eos + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []))
        pad = tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else min(self.eos_token_ids, default=0)
        self.input_device = _input_device(model)
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hf-longattn-generate")
        # Each counter is written by one thread only: submitted by the event loop, the others by the worker.
        self.submitted = self.started = self.finished = self.cancelled = 0
        self._pending: set[Generation] = set()

    # ---- prompts
    def encode_text(self, prompt: str) -> list[int]:
        return self.tokenizer(prompt).input_ids

    def encode_chat(self, messages: list[dict]) -> list[int]:
        try:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as error:  # no template, or one that refuses these messages (jinja raises its own types)
            raise BadRequest(f"the model's chat template cannot format these messages: {error}", "messages") from None
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def check_token_ids(self, ids: list[int], param: str = "prompt") -> None:
        vocab = len(self.tokenizer)
        bad = [i for i in ids if not 0 <= i < vocab]
        if bad:
            raise BadRequest(f"token ids {bad[:5]} are outside the vocabulary (0..{vocab - 1})", param)

    def max_new_tokens(self, prompt_tokens: int, requested: int | None) -> int:
        """The completion budget, or a 400 when the prompt (plus the requested completion) does not fit."""
        if prompt_tokens == 0:
            raise BadRequest("the prompt is empty", "prompt")
        limit = self.max_context
        if limit is not None and prompt_tokens >= limit:
            raise BadRequest(
                f"the prompt has {prompt_tokens} tokens but this model and method take at most {limit} (prompt and "
                "completion together); shorten the prompt", "prompt", code="context_length_exceeded")
        room = None if limit is None else limit - prompt_tokens
        if requested is None:
            return self.default_max_tokens if room is None else min(self.default_max_tokens, room)
        if room is not None and requested > room:
            raise BadRequest(
                f"this model and method take at most {limit} tokens; the prompt has {prompt_tokens}, so max_tokens "
                f"can be at most {room} (got {requested})", "max_tokens", code="context_length_exceeded")
        return requested

    # ---- scheduling
    def submit(self, prompt_ids: list[int], sampling: Sampling, label: str) -> Generation:
        """Queue a generation (call from the event loop); its text arrives through `Generation.text_deltas()`."""
        generation = Generation(self, prompt_ids, sampling, label)
        self.submitted += 1
        self._pending.add(generation)
        future = asyncio.get_running_loop().run_in_executor(self._worker, self._run, generation)
        future.add_done_callback(lambda _: self._pending.discard(generation))
        return generation

    @property
    def queued(self) -> int:
        return self.submitted - self.started

    @property
    def busy(self) -> bool:
        return self.started > self.finished

    def shutdown(self) -> None:
        for generation in list(self._pending):
            generation.cancel()
        self._worker.shutdown(wait=True)

    def _run(self, generation: Generation) -> None:
        self.started += 1
        generation.started_at = time.perf_counter()
        error = None
        try:
            if not generation.cancelled:
                self._generate(generation)
        except Exception as caught:  # reported to this request's client; the server keeps serving
            error = caught
            logger.exception("%s failed", generation.label)
        finally:
            if generation.cancelled:
                self.cancelled += 1
            generation._finish(error)
            self.finished += 1
            self._log(generation)

    def _generate(self, generation: Generation) -> None:
        sampling = generation.sampling
        ids = torch.tensor([generation.prompt_ids], device=self.input_device)
        with torch.inference_mode():
            if sampling.seed is not None:
                torch.manual_seed(sampling.seed)
            self.model.generate(
                ids, attention_mask=torch.ones_like(ids), pad_token_id=self.pad_token_id,
                stopping_criteria=StoppingCriteriaList([generation]), **sampling.generate_kwargs(),
            )

    def _log(self, generation: Generation) -> None:
        timing, usage = generation.timing(), generation.usage()
        logger.info(
            "%s prompt=%d completion=%d queue=%ss ttft=%ss prefill=%s tok/s decode=%s tok/s total=%ss finish=%s%s",
            generation.label, usage["prompt_tokens"], usage["completion_tokens"], timing["queue_s"],
            timing["time_to_first_token_s"], timing["prefill_tokens_per_s"], timing["decode_tokens_per_s"],
            timing["total_s"], generation.finish_reason, f" error={generation.error!r}" if generation.error else "",
        )


def _round(value, digits: int = 4):
    return None if value is None else round(value, digits)


def _input_device(model) -> torch.device:
    """Where input ids go: the embedding's device (accelerate's hooks move them on from there when it is offloaded)."""
    device = model.get_input_embeddings().weight.device
    return torch.device("cpu") if device.type == "meta" else device
