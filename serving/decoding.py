"""Batched decoding with per-request settings: one forward pass per step for every request in a batch.

Each request brings its own prompt, token budget, temperature, top_p, stop sequences and seed; the
batch shares the model's KV cache (prompts left-padded, padding masked). `stream` yields, step by
step, what each request may show now: tokens that can still turn out to start a stop sequence are
held back until they cannot, so streamed text never contains a stop sequence.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from jobs.data import END_OF_TEXT, PADDING
from jobs.model import TransformerLM, sample_next


@dataclass
class Generation:
    prompt: list[int]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[list[int]] = field(default_factory=list)
    seed: int | None = None


@dataclass
class Step:
    """What one request shows after a decoding step; `finish_reason` is set on its last step."""

    tokens: list[int]
    finish_reason: str | None = None


class _Row:
    def __init__(self, generation: Generation, device: torch.device):
        self.generation = generation
        self.output: list[int] = []
        self.shown = 0
        self.finish_reason: str | None = None
        self.generator = None
        if generation.seed is not None:
            # On the logits' device: torch.multinomial refuses a generator of another device.
            self.generator = torch.Generator(device=device).manual_seed(generation.seed)

    def accept(self, token: int) -> Step:
        """Take one sampled token; return what may be shown now."""
        if token in (END_OF_TEXT, PADDING):
            self.finish_reason = "stop"
            return self._release(len(self.output))
        self.output.append(token)
        for sequence in self.generation.stop:
            if self.output[-len(sequence) :] == sequence:
                del self.output[-len(sequence) :]
                self.finish_reason = "stop"
                return self._release(len(self.output))
        if len(self.output) >= self.generation.max_tokens:
            self.finish_reason = "length"
            return self._release(len(self.output))
        return self._release(len(self.output) - self._held_back())

    def _held_back(self) -> int:
        """Length of the longest output suffix that is a proper prefix of some stop sequence."""
        longest = 0
        for sequence in self.generation.stop:
            for length in range(min(len(sequence) - 1, len(self.output)), longest, -1):
                if self.output[-length:] == sequence[:length]:
                    longest = length
                    break
        return longest

    def _release(self, upto: int) -> Step:
        upto = max(upto, self.shown)
        tokens = self.output[self.shown : upto]
        self.shown = upto
        return Step(tokens, self.finish_reason)


class BatchDecoder:
    def __init__(self, model: TransformerLM):
        self.model = model
        self.context_length = model.size.context_length

    @torch.no_grad()
    def stream(self, generations: Sequence[Generation]) -> Iterator[list[Step | None]]:
        """Per step, one entry per request: a Step, or None once that request has finished."""
        if not generations:
            return
        for index, generation in enumerate(generations):
            if not generation.prompt:
                raise ValueError(f"request {index}: the prompt needs at least one token")
            if len(generation.prompt) + generation.max_tokens > self.context_length:
                raise ValueError(
                    f"request {index}: prompt ({len(generation.prompt)} tokens) + max_tokens "
                    f"({generation.max_tokens}) exceeds the model's context of {self.context_length}"
                )
        device = self.model.embedding.weight.device
        rows = [_Row(generation, device) for generation in generations]
        longest = max(len(g.prompt) for g in generations)
        budget = max(g.max_tokens for g in generations)
        tokens = torch.zeros(len(rows), longest, dtype=torch.long, device=device)
        mask = torch.zeros(len(rows), longest, dtype=torch.bool, device=device)
        for index, generation in enumerate(generations):
            tokens[index, longest - len(generation.prompt) :] = torch.tensor(generation.prompt)
            mask[index, longest - len(generation.prompt) :] = True
        cache = self.model.new_cache(len(rows), longest + budget)
        logits = self.model(tokens, cache, mask)[:, -1]
        greedy_rows = torch.tensor([g.temperature <= 0 for g in generations], device=device)
        for _ in range(budget):
            # One argmax for every greedy row; only rows that sample pay for a call of their own.
            next_tokens = torch.where(greedy_rows, logits.argmax(dim=-1), 0)
            steps: list[Step | None] = []
            for index, row in enumerate(rows):
                if row.finish_reason is not None:
                    steps.append(None)
                    continue
                if not greedy_rows[index]:
                    next_tokens[index] = sample_next(
                        logits[index : index + 1], row.generation.temperature, row.generation.top_p, row.generator
                    )[0]
                steps.append(row.accept(int(next_tokens[index])))
            yield steps
            running = torch.tensor([row.finish_reason is None for row in rows], device=device)
            if not running.any():
                return
            logits = self.model(next_tokens[:, None], cache, running[:, None])[:, -1]

    def complete(self, generations: Sequence[Generation]) -> list[tuple[list[int], str]]:
        """Whole completions: (tokens, finish_reason) per request."""
        outputs: list[list[int]] = [[] for _ in generations]
        reasons = ["length"] * len(generations)
        for steps in self.stream(generations):
            for index, step in enumerate(steps):
                if step is not None:
                    outputs[index].extend(step.tokens)
                    if step.finish_reason:
                        reasons[index] = step.finish_reason
        return list(zip(outputs, reasons, strict=True))
