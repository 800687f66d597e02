import json
import random
import re
from pathlib import Path

import pytest
import transformers
from chat_templates import (
    CONVERSATIONS,
    CUSTOM_TEMPLATE,
    LLAMA3_TEMPLATE,
    QWEN_TEMPLATE,
    TOOL_CONVERSATION,
    TOOLS,
)
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from shoal.model import DEMO_PATH
from shoal.model.detokenize import StreamDecoder
from shoal.model.errors import ChatTemplateError, ModelFileError
from shoal.model.tokenizer import Tokenizer

SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|end_of_text|>",
            "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|system|>", "<|user|>", "<|assistant|>",
            "<|end|>"]

WORDS = ("the quick brown fox jumps over lazy dog hello world how are you today weather paris tools "
                  "system user assistant answer french bonjour comment ça va 日本語 météo ville")


@pytest.fixture(scope="module")
def backend() -> BackendTokenizer:
    rng, words = random.Random(0), WORDS.split()
    sentences = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) for _ in range(300)]
    tok = BackendTokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(sentences, trainer)
    return tok


def save_dir(path: Path, backend: BackendTokenizer, template: str | dict | None, bos_post: bool = False,
             jinja_files: bool = True, **special: str) -> Path:
    tok = BackendTokenizer.from_str(backend.to_str())
    if bos_post:
        bos = special.get("bos_token", "<s>")
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))])
    special = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>", **special}
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, chat_template=template, **special)
    hf.save_pretrained(path, save_jinja_files=jinja_files)
    return path


def load_both(path: Path) -> tuple[Tokenizer, object]:
    return Tokenizer.from_dir(path), transformers.AutoTokenizer.from_pretrained(path)


def assert_same_chat(ours: Tokenizer, hf, messages: list[dict], **kwargs) -> None:
    for gen in (False, True):
        expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen, **kwargs)
        assert ours.apply_chat_template(messages, add_generation_prompt=gen, **kwargs) == expected


@pytest.fixture(scope="module")
def qwen(backend, tmp_path_factory):
    return load_both(save_dir(tmp_path_factory.mktemp("qwen"), backend, QWEN_TEMPLATE,
                              bos_token=None, eos_token="<|im_end|>", pad_token="<|end_of_text|>"))


@pytest.fixture(scope="module")
def llama(backend, tmp_path_factory):
    return load_both(save_dir(tmp_path_factory.mktemp("llama"), backend, LLAMA3_TEMPLATE, bos_post=True,
                              bos_token="<|begin_of_text|>", eos_token="<|eot_id|>"))


@pytest.fixture(scope="module")
def custom(backend, tmp_path_factory):
    return load_both(save_dir(tmp_path_factory.mktemp("custom"), backend, CUSTOM_TEMPLATE, bos_post=True))


@pytest.fixture(scope="module")
def demo():
    return load_both(DEMO_PATH)


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("family", ["qwen", "llama", "custom", "demo"])
def test_chat_template_matches_transformers(family, name, request):
    ours, hf = request.getfixturevalue(family)
    assert_same_chat(ours, hf, CONVERSATIONS[name])


@pytest.mark.parametrize("family", ["qwen", "llama"])
def test_tools_match_transformers(family, request):
    ours, hf = request.getfixturevalue(family)
    assert_same_chat(ours, hf, TOOL_CONVERSATION, tools=TOOLS)
    assert_same_chat(ours, hf, CONVERSATIONS["system"], tools=TOOLS)


def test_template_kwargs_reach_the_template(llama):
    ours, hf = llama
    assert_same_chat(ours, hf, CONVERSATIONS["system"], date_string="01 Jan 2000")
    assert "Today Date: 01 Jan 2000" in ours.apply_chat_template(CONVERSATIONS["user"], date_string="01 Jan 2000")


def test_encode_chat_matches_transformers(qwen, llama, custom, demo):
    for ours, hf in (qwen, llama, custom, demo):
        for messages in CONVERSATIONS.values():
            expected = hf.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
            assert ours.encode_chat(messages) == expected
    ours, _ = llama
    assert ours.encode_chat(CONVERSATIONS["user"]).count(ours.token_to_id("<|begin_of_text|>")) == 1


@pytest.mark.parametrize("jinja_files", [True, False])
def test_template_loads_from_jinja_file_and_config(backend, tmp_path, jinja_files):
    path = save_dir(tmp_path, backend, CUSTOM_TEMPLATE, jinja_files=jinja_files)
    assert (path / "chat_template.jinja").is_file() == jinja_files
    config = json.loads((path / "tokenizer_config.json").read_text())
    assert ("chat_template" in config) != jinja_files
    ours, hf = load_both(path)
    assert ours.chat_template() == CUSTOM_TEMPLATE
    assert_same_chat(ours, hf, CONVERSATIONS["multi_turn"])


@pytest.mark.parametrize("jinja_files", [True, False])
def test_named_templates_pick_default_or_tool_use(backend, tmp_path, jinja_files):
    templates = {"default": CUSTOM_TEMPLATE, "tool_use": QWEN_TEMPLATE}
    path = save_dir(tmp_path, backend, templates, jinja_files=jinja_files)
    if not jinja_files:
        assert isinstance(json.loads((path / "tokenizer_config.json").read_text())["chat_template"], list)
    ours, hf = load_both(path)
    assert ours.chat_templates == templates
    assert_same_chat(ours, hf, CONVERSATIONS["system"])
    assert_same_chat(ours, hf, TOOL_CONVERSATION, tools=TOOLS)


TEXTS = ["Hello world", " the quick  brown fox\n\njumps", "", "météo 日本語 🐟", "<|im_start|>user\nhi<|im_end|>",
         "<s>already has a bos</s>"]


@pytest.mark.parametrize("bos_post", [True, False])
def test_encode_decode_match_transformers(backend, tmp_path, bos_post):
    ours, hf = load_both(save_dir(tmp_path, backend, None, bos_post=bos_post))
    for text in TEXTS:
        for add in (True, False):
            ids = ours.encode(text, add_special_tokens=add)
            assert ids == hf.encode(text, add_special_tokens=add)
            for skip in (True, False):
                assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
    assert (ours.encode("hi")[0] == ours.token_to_id("<s>")) == bos_post
    assert ours.vocab_size == len(hf)
    assert ours.token_to_id("<|im_end|>") == hf.convert_tokens_to_ids("<|im_end|>")
    assert ours.token_to_id("not-a-token") is None


def test_special_tokens(qwen, llama, backend, tmp_path):
    ours, hf = qwen
    assert (ours.bos_token, ours.eos_token, ours.pad_token, ours.unk_token) == (
        None, "<|im_end|>", "<|end_of_text|>", "<unk>")
    ours, hf = llama
    assert (ours.bos_token, ours.eos_token) == (hf.bos_token, hf.eos_token) == ("<|begin_of_text|>", "<|eot_id|>")
    path = save_dir(tmp_path, backend, CUSTOM_TEMPLATE)
    config = json.loads((path / "tokenizer_config.json").read_text())
    config["bos_token"] = {"__type": "AddedToken", "content": "<|system|>", "lstrip": False, "normalized": False,
                           "rstrip": False, "single_word": False, "special": True}
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    ours, hf = load_both(path)
    assert ours.bos_token == hf.bos_token == "<|system|>"
    assert_same_chat(ours, hf, CONVERSATIONS["user"])


@pytest.mark.parametrize(("files", "expected"), [
    ({"generation_config.json": {"eos_token_id": [10, 2]}, "config.json": {"eos_token_id": 7}}, [10, 2]),
    ({"generation_config.json": {"eos_token_id": 10}}, [10]),
    ({"generation_config.json": {"bos_token_id": 1}, "config.json": {"eos_token_id": 7}}, [7]),
    ({}, None),
])
def test_eos_token_ids(backend, tmp_path, files, expected):
    path = save_dir(tmp_path, backend, None)
    for name, content in files.items():
        (path / name).write_text(json.dumps(content))
    tok = Tokenizer.from_dir(path)
    assert tok.eos_token_ids == (expected or [tok.token_to_id("</s>")])


def test_missing_tokenizer_json(tmp_path):
    with pytest.raises(ModelFileError, match=re.escape(str(tmp_path / "tokenizer.json"))):
        Tokenizer.from_dir(tmp_path)


def test_no_chat_template(backend, tmp_path):
    tok = Tokenizer.from_dir(save_dir(tmp_path, backend, None))
    with pytest.raises(ChatTemplateError, match=re.escape(str(tmp_path)) + ".* has no chat template"):
        tok.apply_chat_template(CONVERSATIONS["user"])
    with pytest.raises(ChatTemplateError, match="has no chat template"):
        tok.encode_chat(CONVERSATIONS["user"])


def test_raise_exception_surfaces(custom):
    ours, hf = custom
    messages = [{"role": "narrator", "content": "Once"}]
    with pytest.raises(Exception, match="Unknown role: narrator"):
        hf.apply_chat_template(messages, tokenize=False)
    with pytest.raises(ChatTemplateError, match=r"^Unknown role: narrator$"):
        ours.apply_chat_template(messages)


def test_broken_template_is_a_chat_template_error(backend, tmp_path):
    tok = Tokenizer.from_dir(save_dir(tmp_path, backend, "{% for m in messages %}{{ m.content }"))
    with pytest.raises(ChatTemplateError, match="TemplateSyntaxError"):
        tok.apply_chat_template(CONVERSATIONS["user"])


def test_messages_normalized_like_transformers(backend, tmp_path):
    template = ("{% for m in messages %}{{ m.role }} content={{ 'content' in m }} "
                "reasoning={{ m.reasoning_content | default('-') }} thinking={{ m.thinking | default('-') }}\n"
                "{% endfor %}")
    ours, hf = load_both(save_dir(tmp_path, backend, template))
    messages = [{"role": "user", "content": "q"},
                {"role": "assistant", "content": None, "reasoning": "hmm", "tool_calls": None},
                {"role": "assistant", "content": "a", "thinking": "so"}]
    snapshot = json.dumps(messages)
    assert_same_chat(ours, hf, messages)
    assert "content=False reasoning=hmm thinking=hmm" in ours.apply_chat_template(messages)
    assert json.dumps(messages) == snapshot


@pytest.mark.parametrize("text", [*TEXTS[:4], "a 🐟🐟 b", "日本語日本語"])
def test_stream_decoder_deltas_add_up_and_never_split_a_character(backend, tmp_path, text):
    tok = Tokenizer.from_dir(save_dir(tmp_path, backend, None))
    ids = tok.encode(text, add_special_tokens=False)
    decoder = StreamDecoder(tok)
    deltas = [decoder.push(i) for i in ids]
    assert "".join(deltas) == tok.decode(ids, skip_special_tokens=True)
    assert not any("\ufffd" in d for d in deltas)
