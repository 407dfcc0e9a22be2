"""The transformer: causal, and generation with a KV cache equals recomputing from scratch."""

from __future__ import annotations

import pytest
import torch

from jobs.model import TransformerLM
from jobs.spec import ModelSize

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model() -> TransformerLM:
    torch.manual_seed(0)
    model = TransformerLM(ModelSize(layers=2, d_model=64, heads=4, context_length=64), vocab_size=258).eval()
    # Untrained tied embeddings mostly predict the last token again; larger random weights make
    # greedy outputs vary, so comparing them means something.
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() >= 2:
                parameter.normal_(0, 0.3)
    return model


def recompute_greedy(model: TransformerLM, prompt: list[int], new_tokens: int) -> list[int]:
    """Reference: no cache, the whole sequence again for every token."""
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(new_tokens):
            tokens.append(int(model(torch.tensor([tokens]))[0, -1].argmax()))
    return tokens[len(prompt) :]


def test_future_tokens_do_not_change_past_logits(model):
    tokens = torch.randint(0, 256, (2, 40))
    changed = tokens.clone()
    changed[:, 25:] = torch.randint(0, 256, (2, 15))
    with torch.no_grad():
        before, after = model(tokens), model(changed)
    torch.testing.assert_close(before[:, :25], after[:, :25])
    assert not torch.allclose(before[:, 25:], after[:, 25:])


def test_cached_forward_in_pieces_equals_one_full_forward(model):
    tokens = torch.randint(0, 256, (2, 30))
    with torch.no_grad():
        full = model(tokens)
        cache = model.new_cache(2, 30)
        pieces = [model(tokens[:, :17], cache), model(tokens[:, 17:18], cache), model(tokens[:, 18:], cache)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-4, atol=1e-4)


def test_left_padded_rows_compute_what_they_would_alone(model):
    short, long = torch.randint(0, 256, (1, 9)), torch.randint(0, 256, (1, 20))
    padded = torch.cat([torch.zeros(1, 11, dtype=torch.long), short], dim=1)
    tokens = torch.cat([padded, long])
    mask = torch.ones(2, 20, dtype=torch.bool)
    mask[0, :11] = False
    with torch.no_grad():
        batched = model(tokens, token_mask=mask)
        torch.testing.assert_close(batched[0, 11:], model(short)[0], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(batched[1], model(long)[0], rtol=1e-4, atol=1e-4)


def test_batched_cached_generation_equals_full_recompute(model):
    prompts = [list(b"def main("), list(b"import o"), list(b"x")]
    generated = model.generate(prompts, max_new_tokens=12, temperature=0)
    expected = [recompute_greedy(model, prompt, 12) for prompt in prompts]
    assert generated == expected
    assert len({tuple(tokens) for tokens in expected}) > 1, "outputs should differ between prompts"
    assert any(len(set(tokens)) > 2 for tokens in expected), "outputs should not repeat one token"


def cut_at(tokens: list[int], stop: list[int]) -> list[int]:
    """Tokens up to the first occurrence of `stop`."""
    for end in range(len(stop), len(tokens) + 1):
        if tokens[end - len(stop) : end] == stop:
            return tokens[: end - len(stop)]
    return tokens


def test_stop_sequence_ends_a_row_and_is_left_out(model):
    prompts = [list(b"class A:"), list(b"for i")]
    free = model.generate(prompts, max_new_tokens=10, temperature=0)
    stop = free[0][3:5]
    stopped = model.generate(prompts, max_new_tokens=10, temperature=0, stop=[stop])
    assert stopped == [cut_at(tokens, stop) for tokens in free]
    assert len(stopped[0]) <= 3


def test_sampling_is_seeded_and_top_p_keeps_the_likeliest(model):
    prompt = [list(b"while ")]
    first = model.generate(prompt, 8, temperature=1.0, top_p=0.9, generator=torch.Generator().manual_seed(5))
    again = model.generate(prompt, 8, temperature=1.0, top_p=0.9, generator=torch.Generator().manual_seed(5))
    assert first == again
    # top_p so small that only the most likely token survives: sampling becomes greedy.
    assert model.generate(prompt, 8, temperature=1.0, top_p=1e-6) == model.generate(prompt, 8, temperature=0)


def test_generation_refuses_to_run_past_the_context(model):
    with pytest.raises(ValueError, match="exceeds context_length 64"):
        model.generate([[1] * 60], max_new_tokens=10)
