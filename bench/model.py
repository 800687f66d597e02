"""Prefill and single-sequence decode speed: shoal's model against transformers, same weights, same run.

Prints JSON. Runs are interleaved (transformers, shoal, transformers, ...) and the median is kept,
so background load hits both sides alike. Usage: python bench/model.py [--models qwen-0.5b,demo]
"""

import shoal  # noqa: F401  (before torch: it sets how torch's threads wait, see shoal/__init__.py)

# isort: split
import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import transformers

from shoal.model import DEMO_PATH, load_model
from shoal.model.generate import generate

QWEN_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 1e6})


def random_qwen(path: Path) -> Path:
    config = transformers.Qwen2Config(**QWEN_05B)
    torch.manual_seed(0)
    transformers.Qwen2ForCausalLM(config).save_pretrained(path)
    return path


def hf_run(model, prompt: list[int], new_tokens: int) -> tuple[float, float]:
    cache = transformers.DynamicCache()
    with torch.inference_mode():
        t0 = time.perf_counter()
        # logits_to_keep=1, as transformers' own generate does: shoal also projects only the last position
        out = model(torch.tensor([prompt]), past_key_values=cache, use_cache=True, logits_to_keep=1)
        t1 = time.perf_counter()
        token = out.logits[0, -1].argmax()
        for _ in range(new_tokens):
            out = model(token.view(1, 1), past_key_values=out.past_key_values, use_cache=True)
            token = out.logits[0, -1].argmax()
        t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def shoal_run(model, prompt: list[int], new_tokens: int) -> tuple[float, float]:
    stream = generate(model, prompt, max_tokens=new_tokens + 1)
    t0 = time.perf_counter()
    next(stream)
    t1 = time.perf_counter()
    for _ in stream:
        pass
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def bench(path: Path, prompt_len: int, new_tokens: int, repeats: int) -> dict:
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ours = load_model(path, device="cpu")
    vocab = ours.config.vocab_size
    prompt = torch.randint(0, vocab, (prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()
    hf_run(hf, prompt[:8], 2), shoal_run(ours, prompt[:8], 2)  # warm-up
    times = {"transformers": [], "shoal": []}
    for _ in range(repeats):
        times["transformers"].append(hf_run(hf, prompt, new_tokens))
        times["shoal"].append(shoal_run(ours, prompt, new_tokens))
    result = {}
    for name, runs in times.items():
        prefill = statistics.median(r[0] for r in runs)
        decode = statistics.median(r[1] for r in runs)
        result[name] = {"prefill_tok_s": round(prompt_len / prefill, 1), "decode_tok_s": round(new_tokens / decode, 2)}
    for kind in ("prefill", "decode"):
        key = f"{kind}_tok_s"
        result[f"{kind}_ratio"] = round(result["shoal"][key] / result["transformers"][key], 3)
    result["params_m"] = round(sum(p.numel() for p in ours.parameters()) / 1e6, 1)
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="qwen-0.5b,demo")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    report = {"torch": torch.__version__, "threads": torch.get_num_threads(), "device": "cpu", "dtype": "float32",
              "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            path = random_qwen(Path(tmp) / "qwen") if name == "qwen-0.5b" else DEMO_PATH
            report["models"][name] = bench(path, args.prompt_len, args.new_tokens, args.repeats)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
