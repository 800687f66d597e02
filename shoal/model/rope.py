import math

import torch

from shoal.model.config import ModelConfig


def inv_frequencies(config: ModelConfig) -> torch.Tensor:
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = config.rope_scaling
    if config.rope_type == "linear":
        return inv_freq / scaling["factor"]
    if config.rope_type == "llama3":
        return _llama3(inv_freq, scaling)
    return inv_freq


def _llama3(inv_freq: torch.Tensor, s: dict) -> torch.Tensor:
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, smoothed, scaled)


class Rotary:
    """Rotary position embedding in the half-rotation layout HF checkpoints are trained with.

    cos and sin are looked up in tables over positions [0, length), grown by doubling as contexts grow: two
    lookups a forward instead of computing them (which cost a decode step of a small model more than a
    projection did). sin is stored with its first half negated, so a rotation is a roll and two products."""

    def __init__(self, config: ModelConfig, device: torch.device | str = "cpu"):
        self.inv_freq = inv_frequencies(config).to(device)
        self.limit = config.max_position_embeddings  # doubling stops here: a long context's table is large
        self.cos = self.sin = torch.empty(0, 1, 2 * len(self.inv_freq), device=device)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype, span: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin for `positions`, all below `span`, as [len, 1, head_dim]."""
        if len(self.cos) < span or self.cos.dtype != dtype:
            self._fill(max(span, min(2 * len(self.cos), self.limit), 256), dtype)
        return self.cos.index_select(0, positions), self.sin.index_select(0, positions)

    def fill_all(self, dtype: torch.dtype) -> None:
        """Tables over every position the model takes: they never grow again (a CUDA graph reads them in place)."""
        self._fill(self.limit, dtype)

    def _fill(self, length: int, dtype: torch.dtype) -> None:
        freqs = torch.arange(length, device=self.inv_freq.device).float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        sin = emb.sin()
        sin[:, :len(self.inv_freq)].neg_()
        self.cos, self.sin = emb.cos().to(dtype)[:, None, :], sin.to(dtype)[:, None, :]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    # x.roll(half) is [x2, x1]; with sin's first half negated this is x * cos + [-x2, x1] * sin.
    return x * cos + x.roll(x.shape[-1] // 2, -1) * signed_sin
