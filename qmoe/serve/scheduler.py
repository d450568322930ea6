"""The model thread: N slots, each with its own KV cache, fed from a bounded queue.

    submit(job) --> queue --> a free slot --> prefill (n_batch tokens a turn) --> decode
                                                                  (one batched step for all slots)

Each turn of the loop feeds one prefill chunk of one slot (so a long prompt does
not stall the others for its whole length) and then one decode step of every
slot that is generating: their next tokens go through the model together
(Model.eval_step), which reads an expert once for every slot that routed to it.

Prompt cache: a slot keeps its KV cache after its request ends. A new request
goes to the free slot whose cached tokens share the longest prefix with its
prompt; the cache is cut back to that prefix and only the rest is prefilled, so
the second turn of a chat does not prefill the first again.

Jobs are created on the asyncio side; everything else here runs in the model
thread, which is the only one that touches the model. Results go back through
each job's `emit`, which must be thread-safe (the app wraps call_soon_threadsafe).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from qmoe.engine import Model, Sampler, SamplingParams
from qmoe.models.base import KVCache
from qmoe.serve.protocol import APIError, Usage
from qmoe.serve.text import TextStream

log = logging.getLogger("qmoe.serve")


@dataclass
class Piece:
    """Text that is final (the stop strings checked)."""

    text: str


@dataclass
class Done:
    finish_reason: str  # "stop" (end of generation or a stop string) or "length"
    usage: Usage


@dataclass
class Failed:
    error: APIError


Event = Piece | Done | Failed


@dataclass
class Job:
    """One request as the model thread sees it."""

    prompt_ids: list[int]
    max_tokens: int
    sampling: SamplingParams
    stop: list[str]
    emit: Callable[[Event], None]
    cancelled: bool = False  # set by the asyncio side (the client went away); read by the model thread
    submitted: float = field(default_factory=time.perf_counter)


class Slot:
    """One sequence's KV cache and the request it is serving (if any)."""

    def __init__(self, index: int, cache: KVCache):
        self.index, self.cache = index, cache
        self.tokens: list[int] = []  # what the cache holds, len == cache.n_past
        self.job: Job | None = None
        self.pending: list[int] = []  # prompt tokens still to prefill
        self.next_token: int | None = None  # sampled, to be fed at the next decode step
        self.context: list[int] = []  # prompt + generated, for the repeat penalty
        self.sampler: Sampler | None = None
        self.text: TextStream | None = None
        self.generated = 0
        self.cached = 0  # prompt tokens reused from the previous request
        self.last_used = 0.0

    def common_prefix(self, ids: list[int]) -> int:
        n = 0
        for a, b in zip(self.tokens, ids):
            if a != b:
                break
            n += 1
        return n


class RoutingCounter:
    """An observer of decode steps: routed (token, expert) pairs, and distinct experts read,
    summed over MoE layers. uses / reads is how many tokens each expert read served."""

    def __init__(self):
        self.uses = 0
        self.reads = 0

    def pre_attention(self, layer: int, x: torch.Tensor) -> None:
        pass

    def attended(self, layer: int, h: torch.Tensor) -> None:
        pass

    def routed(self, layer: int, x: torch.Tensor, logits: torch.Tensor, ids: torch.Tensor) -> None:
        self.uses += ids.numel()
        self.reads += len(torch.unique(ids))


@dataclass
class Counters:
    """What /metrics reports; written by the model thread, read under the scheduler's lock."""

    requests: dict[str, int] = field(default_factory=lambda: {"stop": 0, "length": 0, "cancelled": 0, "error": 0})
    rejected: int = 0  # 503s: queue full or shutting down
    prompt_tokens: int = 0  # prefilled (the cached ones excluded)
    cached_tokens: int = 0
    prompt_s: float = 0.0
    generated_tokens: int = 0
    decode_steps: int = 0
    decode_s: float = 0.0
    routing: RoutingCounter = field(default_factory=RoutingCounter)


class Scheduler:
    def __init__(self, model: Model, n_slots: int, queue_size: int):
        self.model = model
        self.slots = [Slot(i, model.new_cache()) for i in range(n_slots)]
        self.queue: deque[Job] = deque()
        self.queue_size = queue_size
        self.cond = threading.Condition()
        self.counters = Counters()
        self.drain_deadline: float | None = None
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="qmoe-model", daemon=True)

    # -- the asyncio side

    def start(self) -> None:
        self.thread.start()

    def submit(self, job: Job) -> None:
        """Queue `job`, or refuse it with a 503 when the queue is full or the server is stopping."""
        with self.cond:
            if self.drain_deadline is not None or self.stopping:
                self.counters.rejected += 1
                raise APIError(503, "The server is shutting down", code="shutting_down")
            free = sum(s.job is None for s in self.slots)
            if len(self.queue) - free >= self.queue_size:  # jobs beyond the free slots wait in the queue
                self.counters.rejected += 1
                raise APIError(503, f"The server is busy: all {len(self.slots)} slots are generating and "
                               f"{len(self.queue)} requests are waiting; retry later", code="server_busy")
            self.queue.append(job)
            self.cond.notify()

    def cancel(self, job: Job) -> None:
        """The client went away: drop the job from the queue, or have its slot freed at the next turn."""
        with self.cond:
            job.cancelled = True
            if job in self.queue:
                self.queue.remove(job)
                self.counters.requests["cancelled"] += 1
            self.cond.notify()

    def drain(self, grace_s: float) -> None:
        """Stop taking requests; the ones in flight get `grace_s` seconds to finish, then end."""
        with self.cond:
            if self.drain_deadline is None:
                self.drain_deadline = time.perf_counter() + grace_s
            self.cond.notify()

    @property
    def draining(self) -> bool:
        return self.drain_deadline is not None

    def stop(self) -> None:
        """End every request and the model thread (after drain, or at once)."""
        with self.cond:
            self.stopping = True
            self.cond.notify()
        if self.thread.is_alive():
            self.thread.join()

    def snapshot(self) -> dict:
        with self.cond:
            c = self.counters
            return {
                "slots": len(self.slots), "slots_busy": sum(s.job is not None for s in self.slots),
                "queued": len(self.queue), "requests": dict(c.requests), "rejected": c.rejected,
                "prompt_tokens": c.prompt_tokens, "cached_tokens": c.cached_tokens, "prompt_s": c.prompt_s,
                "generated_tokens": c.generated_tokens, "decode_steps": c.decode_steps, "decode_s": c.decode_s,
                "expert_uses": c.routing.uses, "expert_reads": c.routing.reads,
            }

    # -- the model thread

    def _run(self) -> None:
        while True:
            with self.cond:
                for slot in self.slots:
                    if slot.job is not None and slot.job.cancelled:
                        self._release(slot, "cancelled")
                if self.stopping or (self.drain_deadline is not None and time.perf_counter() > self.drain_deadline):
                    self._end_all(APIError(503, "The server is shutting down", code="shutting_down"))
                    if self.stopping:
                        return
                self._admit()
                busy = [s for s in self.slots if s.job is not None]
                if not busy:
                    self.cond.wait(timeout=0.1 if self.drain_deadline is not None else None)
                    continue
            try:
                self._turn(busy)
            except Exception as e:  # a fault in one step must not take the server down
                log.exception("generation failed")
                with self.cond:
                    for slot in busy:
                        if slot.job is not None:
                            slot.job.emit(Failed(APIError(500, f"generation failed: {e}")))
                            self._release(slot, "error")
                        slot.tokens, slot.cache.n_past = [], 0  # its cache may be half written

    def _admit(self) -> None:
        """Give queued jobs (first come, first served) the free slot that has most of their prompt."""
        free = [s for s in self.slots if s.job is None]
        while self.queue and free:
            job = self.queue.popleft()
            slot = max(free, key=lambda s: (s.common_prefix(job.prompt_ids), -s.last_used))
            free.remove(slot)
            keep = min(slot.common_prefix(job.prompt_ids), len(job.prompt_ids) - 1)  # feed >= 1 for logits
            slot.cache.n_past = keep
            slot.tokens = job.prompt_ids[:keep]
            slot.pending = job.prompt_ids[keep:]
            slot.job, slot.cached, slot.generated, slot.next_token = job, keep, 0, None
            slot.context = list(job.prompt_ids)
            slot.sampler = Sampler(job.sampling)
            slot.text = TextStream(self.model.tokenizer, job.stop)
            self.counters.cached_tokens += keep

    def _turn(self, busy: list[Slot]) -> None:
        decoding = [s for s in busy if s.next_token is not None]
        prefilling = [s for s in busy if s.pending]
        if prefilling:
            slot = min(prefilling, key=lambda s: s.job.submitted)
            chunk, slot.pending = slot.pending[:self.model.n_batch], slot.pending[self.model.n_batch:]
            t0 = time.perf_counter()
            logits = self.model.eval(chunk, slot.cache)
            slot.tokens += chunk
            with self.cond:
                self.counters.prompt_tokens += len(chunk)
                self.counters.prompt_s += time.perf_counter() - t0
                if not slot.pending:
                    self._take(slot, logits[-1])
        if decoding:
            t0 = time.perf_counter()
            routing = RoutingCounter()
            logits = self.model.eval_step([s.next_token for s in decoding], [s.cache for s in decoding], routing)
            with self.cond:
                c = self.counters
                c.decode_steps += 1
                c.decode_s += time.perf_counter() - t0
                c.routing.uses += routing.uses
                c.routing.reads += routing.reads
                for slot, row in zip(decoding, logits):
                    slot.tokens.append(slot.next_token)
                    self._take(slot, row)

    def _take(self, slot: Slot, logits: torch.Tensor) -> None:
        """Sample the slot's next token from `logits` and send its text; finish when it is the last."""
        job = slot.job
        if job.cancelled:
            return  # freed at the next turn
        token = slot.sampler(logits.float().cpu().numpy(), slot.context)
        slot.next_token = None
        if token in self.model.tokenizer.eos_ids:
            self._finish(slot, "stop")
            return
        slot.generated += 1
        self.counters.generated_tokens += 1
        slot.context.append(token)
        text = slot.text.push(token)
        if text:
            job.emit(Piece(text))
        if slot.text.stopped:
            self._finish(slot, "stop")
        elif slot.generated >= job.max_tokens:
            self._finish(slot, "length")
        else:
            slot.next_token = token

    def _finish(self, slot: Slot, reason: str) -> None:
        rest = slot.text.finish()
        if rest:
            slot.job.emit(Piece(rest))
        slot.job.emit(Done(reason, Usage(len(slot.job.prompt_ids), slot.generated, slot.cached)))
        self._release(slot, reason)

    def _release(self, slot: Slot, reason: str) -> None:
        self.counters.requests[reason] += 1
        slot.job, slot.pending, slot.next_token, slot.sampler, slot.text = None, [], None, None, None
        slot.last_used = time.perf_counter()

    def _end_all(self, error: APIError) -> None:
        for slot in self.slots:
            if slot.job is not None:
                slot.job.emit(Failed(error))
                self._release(slot, "error")
        while self.queue:
            self.queue.popleft().emit(Failed(error))
            self.counters.requests["error"] += 1
