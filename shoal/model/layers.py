import torch
import torch.nn.functional as F
from torch import nn

from shoal.model import fused, paged
from shoal.model.config import ModelConfig
from shoal.model.kv import AttentionBatch, DecodeGroup, PagedKVCache, PagedRows
from shoal.model.matmul import Linear
from shoal.model.rope import apply_rotary


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2 and fused.supports(x):
            return fused.rms_norm(x, self.weight, self.eps)
        if x.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        # Normalize in fp32 as the reference implementations do; bf16 variance loses too much.
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)
        return self.weight * normed

    def add(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The norm of residual + x, and that sum: the new residual (on a CPU in float32, residual itself)."""
        if fused.supports(x):
            return fused.add_rms_norm(x, residual, self.weight, self.eps)
        residual = residual + x
        return self(residual), residual


class Attention(nn.Module):
    """Grouped-query attention reading and writing K/V through a paged cache."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = (
            config.num_attention_heads, config.num_key_value_heads, config.head_dim)
        self.q_size = self.heads * self.head_dim
        self.kv_size = self.kv_heads * self.head_dim
        self.qkv_proj = Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.qkv_bias)
        self.o_proj = Linear(self.q_size, config.hidden_size, bias=config.o_bias)
        self.qk_norm = config.qk_norm
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], batch: AttentionBatch,
                kv: PagedKVCache, layer: int, keep: torch.Tensor | None = None) -> torch.Tensor:
        """Every row's K/V stored; the output of the rows in `keep` (default: all), in that order."""
        qkv = self.qkv_proj(x)
        rotate = fused.rotate if fused.supports(qkv) else apply_rotary
        v = qkv[:, self.q_size + self.kv_size:].view(-1, self.kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = qkv[:, :self.q_size + self.kv_size].split([self.q_size, self.kv_size], dim=-1)
            q = rotate(self.q_norm(q.view(-1, self.heads, self.head_dim)), *rope)
            k = rotate(self.k_norm(k.view(-1, self.kv_heads, self.head_dim)), *rope)
        else:  # q and k are side by side: rotate them in one go
            qk = rotate(qkv[:, :self.q_size + self.kv_size].view(-1, self.heads + self.kv_heads, self.head_dim),
                        *rope)
            q, k = qk[:, :self.heads], qk[:, self.heads:]
        kv.store(layer, batch.slot_mapping, k, v)
        out = self._attend(q, batch, kv, layer)
        return self.o_proj(out if keep is None else out[keep])

    def _attend(self, q: torch.Tensor, batch: AttentionBatch, kv: PagedKVCache, layer: int) -> torch.Tensor:
        gqa = self.heads != self.kv_heads
        paged_rows = batch.paged
        if not batch.seqs:  # decode only: row i is sequence i's token
            if paged_rows is not None:
                return self._in_place(q, paged_rows, kv, layer)
            if len(batch.decode) == 1:
                return self._decode(q, batch.decode[0], kv, layer)
        out = q.new_empty(q.shape[0], self.q_size)
        if paged_rows is not None:
            out[paged_rows.rows] = self._in_place(q[paged_rows.rows], paged_rows, kv, layer)
        for d in batch.decode:
            out[d.rows] = self._decode(q[d.rows], d, kv, layer)
        for seq in batch.seqs:
            # 4-D [1, heads, len, dim]: with a batch dimension CPU SDPA takes its flash kernel, 2.5-4x faster
            rows = slice(seq.start, seq.start + seq.query_len)
            qi = q[rows].transpose(0, 1)[None]
            ki, vi = (t.transpose(0, 1)[None] for t in kv.gather(layer, seq.context_slots))
            oi = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=seq.mask, is_causal=seq.causal, enable_gqa=gqa)
            out[rows] = oi[0].transpose(0, 1).reshape(seq.query_len, self.q_size)
        return out

    def _in_place(self, q: torch.Tensor, rows: PagedRows, kv: PagedKVCache, layer: int) -> torch.Tensor:
        return paged.attend(q, kv.k[layer], kv.v[layer], rows.tables, rows.lengths, rows.begins, kv.block_size)

    def _decode(self, q: torch.Tensor, d: DecodeGroup, kv: PagedKVCache, layer: int) -> torch.Tensor:
        n, width = d.slots.shape
        k, v = (t.view(n, width, self.kv_heads, self.head_dim).transpose(1, 2)
                for t in kv.gather(layer, d.slots.flatten()))
        # The query heads sharing a KV head attend as the rows of one query: one product per KV head, not one
        # per query head (on a CPU 2x faster in float32, 10x in bfloat16)
        q = q.view(n, self.kv_heads, self.heads // self.kv_heads, self.head_dim)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=d.mask)
        return o.reshape(n, self.q_size)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        # gate and up as one product, as q, k and v are: on a Zen 4 EPYC, one bfloat16 row streamed their weights
        # at 28-31 GB/s in one threaded call (model/gemv.py) against 21-27 in two, and float32 packed products ran
        # 5% faster at 64 rows, 12% at 512
        self.gate_up_proj = Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if fused.supports(gate_up):
            return self.down_proj(fused.silu_mul(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj(F.silu(gate, inplace=True).mul_(up))  # in place: no fresh [rows, intermediate]


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, h: torch.Tensor, residual: torch.Tensor | None, rope: tuple[torch.Tensor, torch.Tensor],
                batch: AttentionBatch, kv: PagedKVCache, layer: int,
                keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's output and the residual stream before it (their sum is the hidden state after it), for
        the rows in `keep` (default: all): each residual add is done in the norm that follows it. residual is
        None in a range's first layer."""
        x, residual = (self.input_layernorm(h), h) if residual is None else self.input_layernorm.add(h, residual)
        attended = self.self_attn(x, rope, batch, kv, layer, keep)
        x, residual = self.post_attention_layernorm.add(attended, residual if keep is None else residual[keep])
        return self.mlp(x), residual
