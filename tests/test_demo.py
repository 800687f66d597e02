"""The shipped demo checkpoint: small, answers held-out prompts, and is a real HF checkpoint."""

import pytest
import torch
import transformers

from shoal.model import DEMO_PATH, load_model
from shoal.model.generate import generate
from shoal.model.tokenizer import Tokenizer

# Arithmetic pairs held out of training (see scripts/demo_tasks.py), in trained and held-out phrasings
HELD_OUT = [
    ("What is 31 + 75?", "31 + 75 = 106"),
    ("How much is 33 plus 61?", "33 + 61 = 94"),
    ("Compute 32 minus 90.", "32 - 90 = -58"),
    ("How much is 34 minus 21?", "34 - 21 = 13"),
    ("Tell me the capital of Kenya.", "The capital of Kenya is Nairobi."),
    ("Please name the capital city of Norway.", "The capital of Norway is Oslo."),
    ("Which city is the capital of Argentina?", "The capital of Argentina is Buenos Aires."),
    ("Good evening!", "Hello! I am shoal's demo model. I can add and subtract numbers, name capitals, "
                      "reverse and spell words, and count letters."),
]


@pytest.fixture(scope="module")
def demo():
    return load_model(DEMO_PATH, device="cpu"), Tokenizer.from_dir(DEMO_PATH)


def reply_ids(demo, prompt: str) -> list[int]:
    model, tok = demo
    out = list(generate(model, tok.encode_chat([{"role": "user", "content": prompt}]), 48, stop_ids=tok.eos_token_ids))
    return out[:-1] if out and out[-1] in tok.eos_token_ids else out


def test_checkpoint_is_small_and_complete():
    files = {f.name: f.stat().st_size for f in DEMO_PATH.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json"} <= set(files)
    assert sum(files.values()) <= 25 * 2**20


@pytest.mark.parametrize(("prompt", "expected"), HELD_OUT)
def test_answers_held_out_prompts(demo, prompt, expected):
    assert demo[1].decode(reply_ids(demo, prompt), skip_special_tokens=True) == expected


def test_transformers_loads_it_and_answers_the_same(demo):
    model = transformers.AutoModelForCausalLM.from_pretrained(DEMO_PATH).eval()
    tok = transformers.AutoTokenizer.from_pretrained(DEMO_PATH)
    for prompt, expected in HELD_OUT[:4]:
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"]
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=48, do_sample=False)[0, ids.shape[1]:].tolist()
        assert tok.decode(out, skip_special_tokens=True) == expected
        assert out[:-1] == reply_ids(demo, prompt)
