"""Score a demo checkpoint: greedy exact-match accuracy per task on held-out prompts, printed as JSON.

Held out means arithmetic pairs never trained on, and phrasings never trained on (see demo_tasks.py).
`--transformers` also runs the same prompts through transformers and counts where the two disagree.
Usage: python scripts/eval_demo.py [--model shoal/model/demo] [--n 50] [--transformers]
"""

import argparse
import json
import sys
from functools import cache
from pathlib import Path

import torch

from shoal.model import DEMO_PATH, load_model
from shoal.model.generate import generate
from shoal.model.tokenizer import Tokenizer

sys.path.insert(0, str(Path(__file__).parent))
import demo_tasks


def shoal_reply(path: Path, max_tokens: int = 48):
    model, tok = load_model(path, device="cpu"), Tokenizer.from_dir(path)

    def reply(prompt: str) -> str:
        ids = tok.encode_chat([{"role": "user", "content": prompt}])
        out = list(generate(model, ids, max_tokens, stop_ids=tok.eos_token_ids))
        return tok.decode(out, skip_special_tokens=True)
    return reply


def transformers_reply(path: Path, max_tokens: int = 48):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    tok = transformers.AutoTokenizer.from_pretrained(path)

    def reply(prompt: str) -> str:
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"]
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=max_tokens, do_sample=False)
        return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    return reply


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEMO_PATH)
    parser.add_argument("--n", type=int, default=50, help="Prompts per task.")
    parser.add_argument("--transformers", action="store_true", help="Also compare with transformers' answers.")
    args = parser.parse_args()
    examples = demo_tasks.eval_set(args.n)
    ours = cache(shoal_reply(args.model))  # scored, then compared with transformers: generate each once
    report: dict = {"model": str(args.model), "prompts_per_task": args.n,
                    "accuracy": demo_tasks.score(ours, examples)}
    if args.transformers:
        theirs = transformers_reply(args.model)
        report["disagreements_with_transformers"] = sum(ours(e.prompt) != theirs(e.prompt) for e in examples)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
