"""The engine against its baselines, all measured in the same run; prints one JSON object.

- throughput_ratio_vs_hf: many sampled requests through shoal's engine, tokens/s, over transformers
  `generate` on static left-padded batches of the same size, same prompts. By default every request is in
  flight at once on both sides (the engine's n_seq_max and transformers' batch are the request count);
  --batch sets a smaller size for both.
- ratio_at_matmul_peak: the throughput ratio shoal would reach if every FLOP of its run (forward_flops) ran at the
  plain matmul's rate and nothing else took time: throughput_ratio_vs_hf = ratio_at_matmul_peak x flops_fraction.
  It is the ceiling of an engine doing this run's work on this machine, so a target ratio needs a flops_fraction
  of at least target / ratio_at_matmul_peak.
- flops_fraction: FLOP/s the engine achieved in that run over a plain matmul's FLOP/s (its best of 5 rounds; on a
  CPU the best of torch's, oneDNN's with a packed weight and, in float32, numpy's BLAS, since the engine may
  multiply with each).
- ttft_speedup_prefix: time to first token of a request whose 1,024-token prefix is cached, vs cold.
- bandwidth_fraction: batch-1 decode tokens/s over the bound weight bytes / memory bandwidth, the bandwidth
  measured as a large tensor copy (bytes read + written per second, best of 5 rounds) just before and just after
  each of 3 sequences, the faster of the two setting that sequence's bound; the best sequence counts.

Full mode uses a random model shaped like Qwen2-0.5B; --quick (a few minutes on 2 cores) uses the
demo model, with a copy whose context is raised to 2,048 for the prefix test.
Usage: python bench/engine.py [--quick] [--dtype bfloat16]
"""

import shoal  # noqa: F401  (before torch: it sets how torch's threads wait, see shoal/__init__.py)

# isort: split
import argparse
import asyncio
import json
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import transformers
from model import random_qwen

from shoal.engine import Engine, EngineConfig, SamplingParams
from shoal.model import DEMO_PATH, Transformer, load_model, tiles
from shoal.model.matmul import pack, packable, packed_product
from shoal.model.tokenizer import Tokenizer

FULL = dict(requests=64, lengths=(32, 512), new_tokens=128)
QUICK = dict(requests=24, lengths=(32, 256), new_tokens=64)


def prompts(vocab: int, n: int, lengths: tuple[int, int], seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(*lengths))] for _ in range(n)]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


async def engine_throughput(engine: Engine, batch: list[list[int]], new_tokens: int) -> float:
    params = SamplingParams(temperature=0.7, max_tokens=new_tokens, ignore_eos=True, seed=0)
    started = time.perf_counter()
    results = await asyncio.gather(*(engine.submit(p, params).result() for p in batch))
    assert all(len(ids) == new_tokens for _, ids, _ in results)
    return time.perf_counter() - started


def hf_throughput(hf: transformers.PreTrainedModel, batch: list[list[int]], new_tokens: int, size: int) -> float:
    device, started = hf.device, time.perf_counter()
    for i in range(0, len(batch), size):
        group = batch[i:i + size]
        width = max(map(len, group))
        ids = torch.tensor([[0] * (width - len(p)) + p for p in group], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in group], device=device)
        with torch.inference_mode():
            out = hf.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=0.7, top_k=0,
                              max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)
        assert out.shape[1] == width + new_tokens
    sync(device)
    return time.perf_counter() - started


def forward_flops(model: Transformer, batch: list[list[int]], new_tokens: int) -> float:
    """Matmul FLOPs of a run: 2 per weight per token through the layers (but the last layer's attention output
    and MLP, which a prompt token skips unless it is sampled), the LM head per sampled token, and attention
    (QK and PV) over each token's context in every layer."""
    c = model.config
    layer_weights = sum(p.numel() for n, p in model.layers.named_parameters() if n.endswith("proj.weight"))
    skipped = sum(p.numel() for n, p in model.layers[-1].named_parameters()
                  if n.endswith("proj.weight") and not n.endswith("qkv_proj.weight"))
    attn_width = c.num_attention_heads * c.head_dim
    flops = 0.0
    for p in batch:
        total = len(p) + new_tokens
        flops += 2 * layer_weights * total - 2 * skipped * (len(p) - 1) + 2 * c.vocab_size * c.hidden_size * new_tokens
        flops += 4 * attn_width * total * (total + 1) / 2 * model.num_layers
    return flops


def best_seconds(work: Callable[[], object], device: torch.device, repeats: int, rounds: int = 5) -> float:
    """Seconds per call of `work`, the best of a few rounds: the machine's peak, so a slow moment of a noisy
    host does not flatter the fractions measured against it."""
    work()
    best = float("inf")
    for _ in range(rounds):
        sync(device)
        started = time.perf_counter()
        for _ in range(repeats):
            work()
        sync(device)
        best = min(best, (time.perf_counter() - started) / repeats)
    return best


def matmul_flops_per_s(device: torch.device, dtype: torch.dtype, n: int = 1024) -> float:
    """The fastest plain matmul of the libraries the engine multiplies with (torch's; on a CPU also oneDNN's with
    a packed weight, `tiles`' over panels, and numpy's for float32): the engine may use any, so the fraction is
    taken of the best."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    seconds = best_seconds(lambda: a @ b, device, repeats=10)
    if device.type == "cpu" and packable(dtype):
        packed = pack(b.T)
        seconds = min(seconds, best_seconds(lambda: packed_product(a, packed), device, repeats=10))
    if device.type == "cpu" and tiles.supports(n, n, dtype):
        panels = tiles.pack(b.T)
        seconds = min(seconds, best_seconds(lambda: tiles.product(a, panels), device, repeats=10))
    if device.type == "cpu" and dtype == torch.float32:
        an, bn = a.numpy(), b.numpy()
        seconds = min(seconds, best_seconds(lambda: an @ bn, device, repeats=10))
    return 2 * n**3 / seconds


def copy_bytes_per_s(device: torch.device, mib: int = 512) -> float:
    src = torch.rand(mib * 2**20 // 4, device=device)  # written, so its pages are real memory, not the zero page
    dst = torch.empty_like(src)
    return 2 * src.nbytes / best_seconds(lambda: dst.copy_(src), device, repeats=3)


async def ttft(engine: Engine, prompt: list[int]) -> float:
    """Seconds to the first token's event (the stream is read to its end, so the engine is idle after)."""
    started, first = time.perf_counter(), None
    stream = engine.submit(prompt, SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
    async for event in stream:
        if event.token_ids and first is None:
            first = time.perf_counter() - started
    return first


async def prefix_speedup(engine: Engine, vocab: int) -> dict:
    prefix = prompts(vocab, 1, (1024, 1024), seed=1)[0]
    cold = await ttft(engine, [*prefix, 5, 6, 7, 8])
    warm = await ttft(engine, [*prefix, 9, 10, 11, 12])
    return {"ttft_cold_ms": round(cold * 1000, 1), "ttft_cached_prefix_ms": round(warm * 1000, 1),
            "ttft_speedup_prefix": round(cold / warm, 2)}


async def batch1_decode(engine: Engine, vocab: int, new_tokens: int, rounds: int = 3) -> tuple[float, float]:
    """Tokens/s of one sequence's decode and the copy bandwidth around it, of the round whose decode came nearest
    its bound. Each round has a bound of its own: a shared host's memory bandwidth moves from one minute to the
    next (copies at 46 and at 78 GB/s on an EPYC VM, products streaming their weights 1.3-1.5x faster too), so a
    bound measured at another moment misjudges the decode."""
    params = SamplingParams(temperature=0, max_tokens=new_tokens + 1, ignore_eos=True)
    device, decodes = engine.model.device, []
    copies = [copy_bytes_per_s(device)]  # one between each two rounds serves both
    for i in range(rounds):
        stream = engine.submit(prompts(vocab, 1, (16, 16), seed=2 + i)[0], params)
        times = [time.perf_counter() async for event in stream if event.token_ids]
        decodes.append(new_tokens / (times[-1] - times[0]))
        copies.append(copy_bytes_per_s(device))
    measured = [(decode, max(before, after))
                for decode, before, after in zip(decodes, copies[:-1], copies[1:], strict=True)]
    return max(measured, key=lambda m: m[0] / m[1])


def weight_bytes(model: Transformer) -> int:
    return sum(p.nbytes for p in model.parameters())


def run(path: Path, prefix_path: Path, setup: dict, dtype: str | None) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(path, device=device, dtype=dtype)
    engine = Engine(model, Tokenizer.from_dir(path), EngineConfig(n_seq_max=setup["batch"], kv_cache_mb=2048))
    vocab, n = model.config.vocab_size, setup["new_tokens"]
    batch = prompts(vocab, setup["requests"], setup["lengths"])
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=model.dtype).to(device).eval()
    hf_throughput(hf, batch[:2], 2, 2)
    asyncio.run(engine_throughput(engine, prompts(vocab, 2, (8, 8), seed=3), 2))
    ours = asyncio.run(engine_throughput(engine, batch, n))
    theirs = hf_throughput(hf, batch, n, setup["batch"])
    del hf
    matmul = matmul_flops_per_s(device, model.dtype)
    decode, bandwidth = asyncio.run(batch1_decode(engine, vocab, 32))
    engine.close()
    bound = bandwidth / weight_bytes(model)
    prefix_engine = Engine.from_dir(prefix_path, EngineConfig(kv_cache_mb=1024, dtype=dtype))
    prefix = asyncio.run(prefix_speedup(prefix_engine, vocab))
    prefix_engine.close()
    tokens, flops = setup["requests"] * n, forward_flops(model, batch, n)
    achieved = flops / ours
    return {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "dtype": str(model.dtype).removeprefix("torch."), "threads": torch.get_num_threads(),
        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1), **setup,
        "shoal_tok_s": round(tokens / ours, 2), "hf_tok_s": round(tokens / theirs, 2),
        "throughput_ratio_vs_hf": round(theirs / ours, 3), "ratio_at_matmul_peak": round(theirs * matmul / flops, 3),
        "matmul_gflop_s": round(matmul / 1e9, 1), "achieved_gflop_s": round(achieved / 1e9, 1),
        "flops_fraction": round(achieved / matmul, 3),
        "copy_gb_s": round(bandwidth / 1e9, 1), "decode_batch1_tok_s": round(decode, 2),
        "decode_bound_tok_s": round(bound, 2), "bandwidth_fraction": round(decode / bound, 3), **prefix,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="demo model, fewer requests (a few minutes on 2 cores)")
    parser.add_argument("--dtype", help="float32, bfloat16 or float16 for shoal and transformers alike "
                        "(default: shoal's own choice for the device)")
    parser.add_argument("--batch", type=int, help="sequences at once, for shoal and transformers alike")
    args = parser.parse_args()
    setup = QUICK if args.quick else FULL
    setup = {**setup, "batch": args.batch or setup["requests"]}
    with tempfile.TemporaryDirectory() as tmp:
        if args.quick:
            path, prefix_path = DEMO_PATH, Path(shutil.copytree(DEMO_PATH, Path(tmp) / "demo-2k"))
            config = json.loads((prefix_path / "config.json").read_text())
            (prefix_path / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 2048}))
        else:
            path = prefix_path = random_qwen(Path(tmp) / "qwen")
            for name in ("tokenizer.json", "tokenizer_config.json"):
                shutil.copy(DEMO_PATH / name, path / name)
        report = run(path, prefix_path, setup, args.dtype)
    print(json.dumps({"mode": "quick" if args.quick else "full", **report}, indent=2))


if __name__ == "__main__":
    main()
