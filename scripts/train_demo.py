"""Build shoal's demo checkpoint: train a BPE tokenizer and a small Llama on the synthetic chat corpus.

Runs on CPU (about 40 minutes on 2 idle cores) and writes an HF-layout directory that both shoal and
transformers load. Usage: python scripts/train_demo.py [--out shoal/model/demo] [--steps N]
"""

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
import transformers
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

sys.path.insert(0, str(Path(__file__).parent))
import demo_tasks

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
MODEL = dict(hidden_size=256, intermediate_size=640, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=4, max_position_embeddings=512, tie_word_embeddings=True,
             rope_parameters={"rope_type": "default", "rope_theta": 10000.0})


def render(messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """The chat as CHAT_TEMPLATE renders it, and the character spans the model learns to write."""
    text, spans = "", []
    for m in messages:
        text += f"<|im_start|>{m['role']}\n"
        if m["role"] == "assistant":
            spans.append((len(text), len(text) + len(m["content"]) + len("<|im_end|>")))
        text += f"{m['content']}<|im_end|>\n"
    return text, spans


def train_tokenizer(vocab_size: int, seed: int) -> Tokenizer:
    rng = random.Random(seed)
    extra = [f"{w} {w[::-1]} {'-'.join(w)}" for w in demo_tasks.WORDS]
    corpus = [render(demo_tasks.conversation(rng))[0] for _ in range(5000)] + extra
    tok = Tokenizer(models.BPE())
    # Single digits keep arithmetic regular: every number is spelled with the same ten tokens.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    return tok


def save_tokenizer(tok: Tokenizer, out: Path) -> dict[str, int]:
    ids = {t: tok.token_to_id(t) for t in SPECIAL}
    tok.save(str(out / "tokenizer.json"))
    added = {str(ids[t]): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                           "single_word": False, "special": True} for t in SPECIAL}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "added_tokens_decoder": added, "bos_token": None,
              "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": None,
              "model_max_length": MODEL["max_position_embeddings"], "clean_up_tokenization_spaces": False,
              "chat_template": CHAT_TEMPLATE}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return ids


def encode(tok: Tokenizer, messages: list[dict[str, str]]) -> tuple[list[int], list[bool]]:
    text, spans = render(messages)
    enc = tok.encode(text, add_special_tokens=False)
    learn = [any(a <= start and end <= b for a, b in spans) for start, end in enc.offsets]
    return enc.ids, learn


def batch(tok: Tokenizer, rng: random.Random, rows: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Conversations packed end to end into rows of `width` tokens: no padding, so no compute is wasted."""
    ids: list[int] = []
    labels: list[int] = []
    while len(ids) < rows * width:
        conv_ids, learn = encode(tok, demo_tasks.conversation(rng))
        ids += conv_ids
        labels += [t if keep else -100 for t, keep in zip(conv_ids, learn, strict=True)]
    shape = (rows, width)
    return torch.tensor(ids[:rows * width]).view(shape), torch.tensor(labels[:rows * width]).view(shape)


def hf_reply(model: transformers.LlamaForCausalLM, tok: Tokenizer, stop: list[int]):
    def reply(prompt: str) -> str:
        text, _ = render([{"role": "user", "content": prompt}])
        ids = torch.tensor([tok.encode(text + "<|im_start|>assistant\n", add_special_tokens=False).ids])
        out = model.generate(ids, max_new_tokens=40, do_sample=False, eos_token_id=stop, pad_token_id=stop[-1])
        return tok.decode(out[0, ids.shape[1]:].tolist(), skip_special_tokens=True)
    return reply


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent.parent / "shoal" / "model" / "demo")
    parser.add_argument("--steps", type=int, default=3800)
    parser.add_argument("--batch", type=int, default=32, help="Rows per step.")
    parser.add_argument("--width", type=int, default=128, help="Tokens per row.")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-every", type=int, default=950, help="Score held-out prompts every N steps (0: never).")
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(args.vocab, args.seed)
    ids = save_tokenizer(tok, args.out)
    config = transformers.LlamaConfig(vocab_size=tok.get_vocab_size(), bos_token_id=None,
                                      eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"], **MODEL)
    model = transformers.LlamaForCausalLM(config)
    params = sum(p.numel() for p in model.parameters())
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.98))
    rng = random.Random(args.seed + 1)
    stop = [ids["<|im_end|>"], ids["<|endoftext|>"]]
    started, loss_avg = time.time(), None
    columns = [TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[info]}"),
               TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*columns) as progress:
        task = progress.add_task(f"training {params / 1e6:.1f}M params", total=args.steps, info="")
        model.train()
        for step in range(args.steps):
            for group in opt.param_groups:
                group["lr"] = lr_at(step, args.steps, args.lr, warmup=100)
            inputs, labels = batch(tok, rng, args.batch, args.width)
            loss = model(input_ids=inputs, labels=labels).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            loss_avg = loss.item() if loss_avg is None else 0.98 * loss_avg + 0.02 * loss.item()
            progress.update(task, advance=1, info=f"loss {loss_avg:.4f}")
            if args.eval_every and (step + 1) % args.eval_every == 0:
                model.eval()
                with torch.no_grad():
                    acc = demo_tasks.score(hf_reply(model, tok, stop), demo_tasks.eval_set(8, seed=step))
                progress.console.print(f"step {step + 1}: loss {loss_avg:.4f} accuracy {json.dumps(acc)}")
                model.train()
    model.eval()
    model.generation_config = transformers.GenerationConfig(
        eos_token_id=stop, pad_token_id=ids["<|endoftext|>"],
        do_sample=False)
    model.save_pretrained(args.out)
    print(json.dumps({"params": params, "steps": args.steps, "batch": args.batch, "final_loss": loss_avg,
                      "minutes": round((time.time() - started) / 60, 1), "out": str(args.out)}))


if __name__ == "__main__":
    main()
