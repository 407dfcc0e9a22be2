"""A decoder-only transformer language model in plain PyTorch.

Pre-norm blocks (RMSNorm), causal self-attention through `scaled_dot_product_attention`, rotary
positions, and an output layer tied to the token embedding. `forward(tokens, cache, token_mask)`
serves both training (no cache, no mask: the fast causal path) and batched generation: prompts of
different lengths are left-padded, `token_mask` marks the real tokens, and each row keeps its own
positions, so a padded row computes exactly what it would alone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from jobs.spec import ModelSize


class KVCache:
    """Keys and values of every layer for a batch of sequences, filled left to right in slots.

    Slot `i` of every row holds the token fed at step `i` of the batch; `filled[b, i]` says whether
    it was a real token of row `b` (padding and tokens fed after a row finished are not).
    """

    def __init__(self, batch_size: int, capacity: int, layers: int, device: torch.device | str = "cpu"):
        self.capacity = capacity
        self.keys: list[torch.Tensor | None] = [None] * layers
        self.values: list[torch.Tensor | None] = [None] * layers
        self.filled = torch.zeros(batch_size, capacity, dtype=torch.bool, device=device)
        self.next_position = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.length = 0

    def store(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's keys/values [B, H, T, D] after the filled slots; return all slots so far."""
        if self.keys[layer] is None:
            batch, heads, _, head_dim = keys.shape
            shape = (batch, heads, self.capacity, head_dim)
            self.keys[layer] = keys.new_zeros(shape)
            self.values[layer] = values.new_zeros(shape)
        cached_keys, cached_values = self.keys[layer], self.values[layer]
        end = self.length + keys.shape[2]
        cached_keys[:, :, self.length : end] = keys
        cached_values[:, :, self.length : end] = values
        return cached_keys[:, :, :end], cached_values[:, :, :end]


def rotary_tables(context_length: int, head_dim: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, each [context_length, head_dim / 2], for rotating feature pairs by position."""
    frequencies = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(context_length, dtype=torch.float32), frequencies)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, H, T, D] by per-token angles; cos and sin are [B, 1, T, D/2]."""
    even, odd = x[..., 0::2].float(), x[..., 1::2].float()
    rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
    return rotated.flatten(-2).type_as(x)


class CausalSelfAttention(nn.Module):
    def __init__(self, size: ModelSize, layer: int):
        super().__init__()
        self.heads = size.heads
        self.layer = layer
        self.qkv = nn.Linear(size.d_model, 3 * size.d_model, bias=False)
        self.out = nn.Linear(size.d_model, size.d_model, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: KVCache | None,
        attention_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.store(self.layer, k, v)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, is_causal=attention_mask is None)
        return self.out(y.transpose(1, 2).reshape(batch, length, width))


class Block(nn.Module):
    def __init__(self, size: ModelSize, layer: int):
        super().__init__()
        self.attention_norm = nn.RMSNorm(size.d_model)
        self.attention = CausalSelfAttention(size, layer)
        self.mlp_norm = nn.RMSNorm(size.d_model)
        self.mlp = nn.Sequential(
            nn.Linear(size.d_model, size.mlp_ratio * size.d_model, bias=False),
            nn.GELU(),
            nn.Linear(size.mlp_ratio * size.d_model, size.d_model, bias=False),
        )

    def forward(self, x, cos, sin, cache, attention_mask):
        x = x + self.attention(self.attention_norm(x), cos, sin, cache, attention_mask)
        return x + self.mlp(self.mlp_norm(x))


class TransformerLM(nn.Module):
    def __init__(self, size: ModelSize, vocab_size: int):
        super().__init__()
        self.size = size
        self.vocab_size = vocab_size
        self.embedding = nn.Embedding(vocab_size, size.d_model)
        self.blocks = nn.ModuleList(Block(size, layer) for layer in range(size.layers))
        self.final_norm = nn.RMSNorm(size.d_model)
        cos, sin = rotary_tables(size.context_length, size.head_dim)
        self.register_buffer("rotary_cos", cos, persistent=False)
        self.register_buffer("rotary_sin", sin, persistent=False)
        self.apply(self._initialise)
        # Scale the residual-branch outputs down with depth (GPT-2) so early training is stable.
        for block in self.blocks:
            for projection in (block.attention.out, block.mlp[2]):
                nn.init.normal_(projection.weight, std=0.02 / math.sqrt(2 * size.layers))

    @staticmethod
    def _initialise(module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(
        self, tokens: torch.Tensor, cache: KVCache | None = None, token_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits [B, T, vocab] for tokens [B, T].

        Without cache and mask this is plain causal attention over positions 0..T-1 (training).
        With a cache the tokens continue the cached ones; `token_mask` [B, T] marks which are real.
        """
        batch, length = tokens.shape
        device = tokens.device
        start = cache.length if cache is not None else 0
        attention_mask = None
        if cache is None and token_mask is None:
            positions = torch.arange(length, device=device)[None]
        else:
            if token_mask is None:
                token_mask = torch.ones(batch, length, dtype=torch.bool, device=device)
            first_position = cache.next_position[:, None] if cache is not None else 0
            positions = (first_position + token_mask.cumsum(1) - 1).clamp(min=0)
            if cache is not None:
                cache.filled[:, start : start + length] = token_mask
                key_is_token = cache.filled[:, : start + length]
            else:
                key_is_token = token_mask
            query_slot = torch.arange(start, start + length, device=device)[:, None]
            key_slot = torch.arange(start + length, device=device)[None, :]
            # A query sees earlier real tokens and always itself, so a padding row is never empty
            # (an all-masked row would give NaN); nothing real ever attends to padding.
            visible = (key_is_token[:, None, :] & (key_slot <= query_slot)) | (key_slot == query_slot)
            attention_mask = visible[:, None]
        last_position = length - 1 if attention_mask is None else int(positions.max())
        if last_position >= self.size.context_length:
            raise ValueError(f"position {last_position} is past context_length {self.size.context_length}")
        cos = self.rotary_cos[positions][:, None]
        sin = self.rotary_sin[positions][:, None]

        x = self.embedding(tokens)
        for block in self.blocks:
            x = block(x, cos, sin, cache, attention_mask)
        if cache is not None:
            cache.length += length
            cache.next_position += token_mask.sum(1)
        return F.linear(self.final_norm(x), self.embedding.weight)

    def new_cache(self, batch_size: int, capacity: int) -> KVCache:
        return KVCache(batch_size, capacity, self.size.layers, device=self.embedding.weight.device)

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        *,
        temperature: float = 1.0,
        top_p: float = 1.0,
        stop: Sequence[Sequence[int]] = (),
        generator: torch.Generator | None = None,
    ) -> list[list[int]]:
        """Continue each prompt by up to `max_new_tokens` tokens, all prompts in one batch.

        temperature 0 is greedy; `top_p` < 1 samples from the smallest set of tokens whose
        probability reaches top_p. A row stops when its output ends with one of the `stop`
        sequences, which is left out of what is returned.
        """
        if not prompts or any(len(prompt) == 0 for prompt in prompts):
            raise ValueError("every prompt needs at least one token")
        longest = max(len(prompt) for prompt in prompts)
        if longest + max_new_tokens > self.size.context_length:
            raise ValueError(
                f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds context_length "
                f"{self.size.context_length}; shorten the prompt or ask for fewer tokens"
            )
        device = self.embedding.weight.device
        batch = len(prompts)
        # What fills the padding does not matter: token_mask hides it from every real token.
        tokens = torch.zeros(batch, longest, dtype=torch.long, device=device)
        token_mask = torch.zeros(batch, longest, dtype=torch.bool, device=device)
        for row, prompt in enumerate(prompts):
            tokens[row, longest - len(prompt) :] = torch.tensor(list(prompt), dtype=torch.long)
            token_mask[row, longest - len(prompt) :] = True

        cache = self.new_cache(batch, longest + max_new_tokens)
        logits = self(tokens, cache, token_mask)[:, -1]
        outputs: list[list[int]] = [[] for _ in range(batch)]
        finished = [False] * batch
        for step in range(max_new_tokens):
            next_tokens = sample_next(logits, temperature, top_p, generator)
            for row, token in enumerate(next_tokens.tolist()):
                if finished[row]:
                    continue
                outputs[row].append(token)
                for sequence in stop:
                    if sequence and outputs[row][-len(sequence) :] == list(sequence):
                        del outputs[row][-len(sequence) :]
                        finished[row] = True
                        break
            if all(finished) or step == max_new_tokens - 1:
                break
            # Finished rows keep a slot per step but as non-tokens, so the batch stays rectangular.
            still_running = torch.tensor([not done for done in finished], device=device)
            logits = self(next_tokens[:, None], cache, still_running[:, None])[:, -1]
        return outputs


def sample_next(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """One token per row of logits [B, vocab]."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    # Shifted so the top logit is 0 before dividing: a tiny temperature then sends the others to -inf, not
    # every logit to +-inf, whose softmax is NaN.
    logits = logits.float()
    probabilities = torch.softmax((logits - logits.max(dim=-1, keepdim=True).values) / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probabilities, sorted_tokens = probabilities.sort(dim=-1, descending=True)
        # Keep a token if the mass before it is still below top_p; the top token always stays.
        mass_before = sorted_probabilities.cumsum(dim=-1) - sorted_probabilities
        sorted_probabilities[mass_before >= top_p] = 0.0
        choice = torch.multinomial(sorted_probabilities, 1, generator=generator)
        return sorted_tokens.gather(-1, choice).squeeze(-1)
    return torch.multinomial(probabilities, 1, generator=generator).squeeze(-1)
