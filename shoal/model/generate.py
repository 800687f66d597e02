from collections.abc import Iterable, Iterator

import torch

from shoal.model.kv import AttentionBatch
from shoal.model.transformer import Transformer


def sample(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> int:
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / temperature, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def generate(model: Transformer, prompt_ids: list[int], max_tokens: int = 32, temperature: float = 0.0,
             seed: int | None = None, stop_ids: Iterable[int] = ()) -> Iterator[int]:
    """Yield up to max_tokens new token ids for one sequence; a stop id is yielded, then generation ends."""
    if not prompt_ids:
        raise ValueError("the prompt is empty")
    limit = model.config.max_position_embeddings
    if len(prompt_ids) >= limit:
        raise ValueError(f"the prompt is {len(prompt_ids)} tokens; the model's context is {limit} tokens")
    max_tokens = min(max_tokens, limit - len(prompt_ids))
    stop = set(stop_ids)
    total = len(prompt_ids) + max_tokens
    kv = model.new_cache(num_blocks=-(-total // 16))
    table = list(range(kv.num_blocks))
    window = model.config.sliding_window
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    inputs, start = prompt_ids, 0
    for _ in range(max_tokens):
        batch = AttentionBatch.build([table], [start], [len(inputs)], kv.block_size, window, model.device, kv.in_place)
        last = torch.tensor([len(inputs) - 1], device=model.device) if len(inputs) > 1 else None  # a prompt
        hidden = model(torch.tensor(inputs, device=model.device), batch, kv, keep=last)
        token = sample(model.compute_logits(hidden[-1]).cpu(), temperature, generator)
        yield token
        if token in stop:
            return
        start, inputs = start + len(inputs), [token]
