import torch
from torch import nn

from shoal.model.config import ModelConfig
from shoal.model.kv import AttentionBatch, PagedKVCache
from shoal.model.layers import DecoderLayer, RMSNorm
from shoal.model.matmul import Linear
from shoal.model.rope import Rotary


class Transformer(nn.Module):
    """A Llama-family decoder restricted to layers [start, end).

    The first range (start == 0) embeds token ids; the last (end == num_hidden_layers) applies the
    final norm and owns the LM head. Any other range maps hidden states to hidden states, so a
    chain of ranges computes exactly what the whole model does.
    """

    def __init__(self, config: ModelConfig, start: int = 0, end: int | None = None):
        super().__init__()
        end = config.num_hidden_layers if end is None else end
        if not 0 <= start < end <= config.num_hidden_layers:
            raise ValueError(f"invalid layer range [{start}, {end}) for a model of {config.num_hidden_layers} layers")
        self.config, self.start, self.end = config, start, end
        self.is_first, self.is_last = start == 0, end == config.num_hidden_layers
        if self.is_first:
            self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(start, end))
        if self.is_last:
            self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
            self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
            self.lm_head.timed_rows = 64  # see Linear.timed_rows
        self.tie()
        self.rotary: Rotary | None = None

    def tie(self) -> None:
        """Share the embedding with the LM head where the checkpoint ties them (moving a model unties them)."""
        if self.is_first and self.is_last and self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def describe(self) -> dict:
        return {"layers": [self.start, self.end], "n_layers": self.config.num_hidden_layers,
                "params_b": sum(p.numel() for p in self.parameters()) / 1e9}

    @property
    def num_layers(self) -> int:
        return self.end - self.start

    @property
    def device(self) -> torch.device:
        return self.layers[0].input_layernorm.weight.device  # read every step: no walk over all parameters

    @property
    def dtype(self) -> torch.dtype:
        return self.layers[0].input_layernorm.weight.dtype

    def new_cache(self, num_blocks: int, block_size: int = 16) -> PagedKVCache:
        c = self.config
        return PagedKVCache(self.num_layers, num_blocks, c.num_key_value_heads, c.head_dim,
                            self.dtype, self.device, block_size)

    @torch.inference_mode()
    def forward(self, inputs: torch.Tensor, batch: AttentionBatch, kv: PagedKVCache, start: int | None = None,
                end: int | None = None, keep: torch.Tensor | None = None) -> torch.Tensor:
        """Layers [start, end) of those held (default: all of them) over token ids [T] when start is layer 0,
        hidden states [T, hidden] otherwise; returns hidden states, normed when end is the model's last layer.
        With `keep` (row indices), only those rows are returned, in that order: the last layer run stores every
        row's K/V but runs its attention output and MLP for those rows alone."""
        start, end = self.start if start is None else start, self.end if end is None else end
        if not self.start <= start < end <= self.end:
            raise ValueError(f"layers [{start}, {end}) are not within the held range [{self.start}, {self.end})")
        # a copy of hidden states from outside: the residual stream is added to in place
        h = self.embed_tokens(inputs) if start == 0 else inputs.to(self.dtype, copy=True)
        rope = self._rotary().cos_sin(batch.positions, h.dtype, batch.span)
        residual = None
        last = end - self.start - 1
        for i in range(start - self.start, end - self.start):
            h, residual = self.layers[i](h, residual, rope, batch, kv, i, keep if i == last else None)
        return self.norm.add(h, residual)[0] if end == self.config.num_hidden_layers else h + residual

    def _rotary(self) -> Rotary:
        if self.rotary is None:
            self.rotary = Rotary(self.config, self.device)
        return self.rotary

    def fill_rotary(self) -> None:
        """The rotary tables at the model's whole context length, where they stay."""
        self._rotary().fill_all(self.dtype)

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """float32 logits [n, vocab]: with `out`, a float32 buffer of at least n rows that the caller keeps, written
        into its first n rows (a fresh tensor of a bfloat16 model's 64 rows of 152k logits page-faults: 10.6 ms, 1.1
        into a kept one)."""
        if not self.is_last:
            raise ValueError(f"layers [{self.start}, {self.end}) do not include the LM head")
        logits = self.lm_head(hidden)
        return logits.float() if out is None or logits.dtype == torch.float32 else out[:len(logits)].copy_(logits)
