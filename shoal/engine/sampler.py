import numpy as np
import torch
from numba import njit, prange

from shoal.engine.params import SamplingParams
from shoal.engine.sequence import Sequence
from shoal.model.fused import exp
from shoal.model.tokenizer import Tokenizer

CHUNK = 1024  # tokens whose probability mass is summed as one, so the inverse CDF scans one chunk token by token


class Sampler:
    """Turns one sequence's logits into its next token, using only that request's parameters and generator."""

    def __init__(self, eos_token_ids: list[int]):
        self.eos_token_ids = eos_token_ids
        # compile (or load from numba's disk cache) now, not in a first request
        pick(torch.zeros(2), 1.0, 0.5), pick_rows(torch.zeros(2, 2), [0.0, 1.0], [0.0, 0.5])

    def sample(self, logits: torch.Tensor, seq: Sequence) -> tuple[int, dict | None]:
        """The next token id, and with logprobs requested {logprob, top: [(token id, logprob)]}."""
        x = self.process(logits, seq)
        p = seq.params
        if p.temperature == 0:
            token = int(x.argmax())
        elif truncates(p):
            token = pick(self.truncate(x / p.temperature, seq), 1.0, draw(seq.generator))
        else:
            token = pick(x, 1 / p.temperature, draw(seq.generator))
        return token, None if p.logprobs is None else logprobs(logits, token, p.logprobs)

    @staticmethod
    def plain(seq: Sequence) -> bool:
        """Whether the request sets nothing but a temperature: its token is sampled alike by `sample_plain`."""
        p = seq.params
        return (not p.logit_bias and p.repetition_penalty == 1.0 and not p.presence_penalty
                and not p.frequency_penalty and len(seq.completion_ids) >= p.min_tokens and not truncates(p)
                and p.logprobs is None)

    @staticmethod
    def sample_plain(logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
        """The next tokens of `plain` sequences, logits [n, vocab], in one pass: the same inverse CDF, with one draw
        from each request's generator (on a GPU one copy back, not a row each; on a CPU the rows split among the
        threads)."""
        temps = [s.params.temperature for s in seqs]
        us = [draw(s.generator) if t else 0.0 for s, t in zip(seqs, temps, strict=True)]
        if logits.device.type == "cpu":
            return pick_rows(logits, [1 / t if t else 0.0 for t in temps], us)
        greedy = torch.tensor([t == 0 for t in temps], device=logits.device)
        scale = torch.tensor([t or 1.0 for t in temps], device=logits.device, dtype=logits.dtype)
        u = torch.tensor(us, device=logits.device, dtype=logits.dtype)
        drawn = inverse_cdf(torch.softmax(logits / scale[:, None], dim=-1), u)
        return torch.where(greedy, logits.argmax(-1), drawn).tolist()

    def process(self, logits: torch.Tensor, seq: Sequence) -> torch.Tensor:
        """Logit bias, penalties and min_tokens applied to a copy of the logits (the logits if none apply)."""
        p, completion = seq.params, seq.completion_ids
        penalize = completion and (p.presence_penalty or p.frequency_penalty)
        if not (p.logit_bias or p.repetition_penalty != 1.0 or penalize or len(completion) < p.min_tokens):
            return logits
        x = logits.clone()
        if p.logit_bias:
            ids = torch.tensor(list(p.logit_bias), dtype=torch.long)
            x[ids] += torch.tensor(list(p.logit_bias.values()), dtype=x.dtype)
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(seq.token_ids)), dtype=torch.long)
            vals = x[seen]
            x[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if penalize:
            ids, counts = torch.tensor(completion, dtype=torch.long).unique(return_counts=True)
            x[ids] -= p.presence_penalty + p.frequency_penalty * counts.to(x.dtype)
        if len(completion) < p.min_tokens:
            x[torch.tensor(self.eos_token_ids + p.stop_token_ids, dtype=torch.long)] = -float("inf")
        return x

    @staticmethod
    def truncate(x: torch.Tensor, seq: Sequence) -> torch.Tensor:
        """top_k, top_p and min_p: logits outside the kept set become -inf."""
        p = seq.params
        if p.top_k and p.top_k < x.numel():
            x = x.masked_fill(x < torch.topk(x, p.top_k).values[-1], -float("inf"))
        if p.top_p < 1.0:
            sorted_x, order = x.sort(descending=True)
            cum = sorted_x.softmax(-1).cumsum(-1)
            drop = cum - sorted_x.softmax(-1) > p.top_p  # keep the smallest set whose mass reaches top_p
            x = x.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), -float("inf"))
        if p.min_p > 0:
            probs = x.softmax(-1)
            x = x.masked_fill(probs < p.min_p * probs.max(), -float("inf"))
        return x


def truncates(p: SamplingParams) -> bool:
    """Whether top_k, top_p or min_p leave some tokens out (`Sampler.truncate`)."""
    return bool(p.top_k or p.top_p < 1.0 or p.min_p)


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The token each row of probs [..., vocab] takes for its uniform draw u [...]: inverse CDF with one draw from
    the request's own generator, so its randomness never depends on the batch (and one draw is ~20x cheaper than
    the vocabulary-wide noise of Gumbel-max)."""
    cdf = probs.cumsum(-1)
    picked = torch.searchsorted(cdf, (u * cdf[..., -1]).unsqueeze(-1), right=True).squeeze(-1)
    return picked.clamp_(max=probs.shape[-1] - 1)


def pick(logits: torch.Tensor, scale: float, u: float) -> int:
    """The token draw u takes by the inverse CDF of softmax(logits * scale), logits [vocab] float32 on a CPU: the
    first whose cumulative probability passes u, as `inverse_cdf` finds it, without its probabilities and cumulative
    sums over the whole vocabulary (sampling 64 rows of a 152k vocabulary: 23 ms with them, 7.5-9 without)."""
    x = logits.contiguous().numpy()
    return int(_pick(x, np.float32(logits.max()), np.float32(scale), np.float32(u), np.empty(-(-len(x) // CHUNK))))


def pick_rows(logits: torch.Tensor, scales: list[float], us: list[float]) -> list[int]:
    """`pick` for each row of logits [n, vocab] float32 on a CPU, with its own scale and draw; a scale of 0 takes
    the row's argmax (greedy). The rows split among the threads."""
    out = np.empty(len(scales), dtype=np.int64)
    x = logits.contiguous()
    _pick_rows(x.numpy(), torch.amax(x, -1).numpy(), np.asarray(scales, np.float32), np.asarray(us, np.float32), out)
    return out.tolist()


@njit(parallel=True, cache=True)
def _pick_rows(x, tops, scales, us, out):
    for r in prange(x.shape[0]):
        if scales[r] == 0:
            out[r] = np.argmax(x[r])
        else:
            out[r] = _pick(x[r], tops[r], scales[r], us[r], np.empty(-(-x.shape[1] // CHUNK)))


@njit(fastmath=True, cache=True)
def _mass(x, top, scale):
    # A loop of its own over a 1-D slice, and top computed outside: only then does numba's code vectorize it. A
    # float32 sum: a chunk is short enough, and with a float64 one 64 rows of a 152k vocabulary took 4.5 ms, not 1.9
    total = np.float32(0.0)
    for i in range(x.shape[0]):
        total += exp((x[i] - top) * scale)
    return total


@njit(fastmath=True, cache=True)
def _pick(x, top, scale, u, sums):
    for c in range(sums.shape[0]):
        sums[c] = _mass(x[c * CHUNK:(c + 1) * CHUNK], top, scale)
    target = u * sums.sum()
    # The chunk whose mass takes the running sum past target (short of it by rounding: the last with any mass)
    chosen, before, acc = 0, 0.0, 0.0  # float64: a float32 running sum over 152k tokens drifts past whole tokens
    for c in range(sums.shape[0]):
        if sums[c] > 0:
            chosen, before = c, acc
            acc += sums[c]
            if acc > target:
                break
    last, acc = chosen * CHUNK, before
    for i in range(chosen * CHUNK, min(x.shape[0], (chosen + 1) * CHUNK)):
        e = exp((x[i] - top) * scale)
        if e > 0:
            last = i
            acc += e
            if acc > target:
                return i
    return last


def draw(generator: torch.Generator) -> float:
    """The one uniform number in [0, 1) a sampled token takes from its request's generator."""
    return float(torch.rand(1, generator=generator, dtype=torch.float64))


def logprobs(logits: torch.Tensor, token: int, k: int) -> dict:
    """The model's log-probability of token and of the k most likely alternatives."""
    lp = torch.log_softmax(logits, dim=-1)
    top = torch.topk(lp, k) if k else None
    alternatives = [] if top is None else list(zip(top.indices.tolist(), top.values.tolist(), strict=True))
    return {"token": token, "logprob": float(lp[token]), "top": alternatives}


def logprob_entries(tokenizer: Tokenizer, entries: list[dict] | None) -> list[dict] | None:
    """The sampler's logprobs with token ids turned into their text, as the API returns them."""
    if entries is None:
        return None
    text = tokenizer.decode
    return [{"token": text([e["token"]]), "logprob": e["logprob"],
             "top": [{"token": text([t]), "logprob": lp} for t, lp in e["top"]]} for e in entries]
