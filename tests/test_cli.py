"""`shoal generate` and `shoal chat` as a user runs them: real subprocesses on the shipped demo model."""

import json
import subprocess
import sys
from pathlib import Path

import transformers

from shoal.model import DEMO_PATH
from shoal.model.tokenizer import Tokenizer

SHOAL = str(Path(sys.executable).with_name("shoal"))


def shoal(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([SHOAL, *args], input=stdin, capture_output=True, text=True, timeout=120)


def test_generate_chat_json():
    out = shoal("generate", "--prompt", "What is 84 + 27?", "--chat", "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["text"] == "84 + 27 = 111"
    tok = Tokenizer.from_dir(DEMO_PATH)
    assert result["prompt_token_ids"] == tok.encode_chat([{"role": "user", "content": "What is 84 + 27?"}])
    assert tok.decode(result["token_ids"], skip_special_tokens=True) == result["text"]


def test_generate_raw_prompt_has_no_template():
    out = shoal("generate", "--prompt", "<|im_start|>user\nSpell cat.<|im_end|>\n<|im_start|>assistant\n",
                "--max-tokens", "3", "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    hf = transformers.AutoTokenizer.from_pretrained(DEMO_PATH)
    assert result["prompt_token_ids"] == hf.encode("<|im_start|>user\nSpell cat.<|im_end|>\n<|im_start|>assistant\n")
    assert len(result["token_ids"]) == 3


def test_generate_streams_plain_text():
    out = shoal("generate", "--prompt", "What is the capital of Japan?", "--chat")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "The capital of Japan is Tokyo."


def test_sampling_is_seeded():
    args = ("generate", "--prompt", "Hello!", "--chat", "--temperature", "1.5", "--json")
    first, again = shoal(*args, "--seed", "3"), shoal(*args, "--seed", "3")
    assert json.loads(first.stdout)["token_ids"] == json.loads(again.stdout)["token_ids"]


def test_chat_keeps_the_conversation():
    out = shoal("chat", stdin="/reset\nWhat is the capital of Peru?\nWhat is 70 - 39?\n/exit\n")
    assert out.returncode == 0, out.stderr
    assert "The capital of Peru is Lima." in out.stdout
    assert "70 - 39 = 31" in out.stdout


def test_missing_model_directory_is_a_clear_error(tmp_path):
    out = shoal("generate", "--model", str(tmp_path / "nope"), "--prompt", "hi")
    assert out.returncode == 2
    assert "missing model config" in out.stderr and "nope" in out.stderr


def test_bad_option_names_it():
    out = shoal("generate", "--prompt", "hi", "--max-tokens", "0")
    assert out.returncode == 2
    assert "--max-tokens" in out.stderr


def test_empty_prompt_is_a_clear_error():
    out = shoal("generate", "--prompt", "")
    assert out.returncode == 2
    assert "the prompt is empty" in out.stderr


def test_prompt_longer_than_the_context_is_refused_and_chat_goes_on():
    long = "apple " * 600
    out = shoal("generate", "--prompt", long)
    assert out.returncode == 2
    assert "the model's context is 512 tokens" in out.stderr
    out = shoal("chat", stdin=f"{long}\nWhat is the capital of Peru?\n")
    assert out.returncode == 0
    assert "not added to the conversation" in out.stderr
    assert "The capital of Peru is Lima." in out.stdout
