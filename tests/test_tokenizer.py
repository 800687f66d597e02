import json
import random
import re
from pathlib import Path

import pytest
import transformers
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from shoal.model import DEMO_PATH
from shoal.model.detokenize import StreamDecoder
from shoal.model.errors import ChatTemplateError, ModelFileError
from shoal.model.tokenizer import Tokenizer

SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|end_of_text|>",
            "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|system|>", "<|user|>", "<|assistant|>",
            "<|end|>"]

QWEN_TEMPLATE = """\
{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n" }}
    {{- "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within " }}
    {{- "<tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, " }}
    {{- "\\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or \
(message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

LLAMA3_TEMPLATE = """\
{{- bos_token }}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{%- if tools is not none %}
    {{- "Environment: ipython\\n" }}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}

{%- if tools_in_user_message and not tools is none %}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
    {%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\\n\\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\\n\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + \
'<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
        {{- '{"name": "' + tool_call.name + '", ' }}
        {{- '"parameters": ' }}
        {{- tool_call.arguments | tojson }}
        {{- "}" }}
        {{- "<|eot_id|>" }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

# Exercises the rest of transformers' environment: loopcontrols, namespace, {% generation %}, raise_exception
CUSTOM_TEMPLATE = """\
{% set ns = namespace(turns=0) %}
{% for message in messages %}
    {% if message['role'] not in ['system', 'user', 'assistant'] %}
        {{ raise_exception('Unknown role: ' + message['role']) }}
    {% endif %}
    {% if message['role'] == 'assistant' %}
<|assistant|>
{% generation %}{{ message['content'] }}<|end|>{% endgeneration %}

    {% else %}
        {% set ns.turns = ns.turns + 1 %}
<|{{ message['role'] }}|>
{{ message['content'] }}<|end|>
    {% endif %}
    {% if ns.turns > 8 %}{% break %}{% endif %}
{% endfor %}
{% if add_generation_prompt %}
<|assistant|>
{% else %}
{{ eos_token }}
{% endif %}"""

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Météo actuelle pour une ville — 天気",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "description": "City name, e.g. <Paris> & \"Lyon\""},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city"]}}},
    {"type": "function", "function": {"name": "now", "description": "The time", "parameters": {}}},
]

CONVERSATIONS = {
    "user": [{"role": "user", "content": "Hello there!"}],
    "system": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Why is the sky blue?"}],
    "multi_turn": [
        {"role": "system", "content": "  Answer in French.  "},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Bonjour ! Comment ça va ?"},
        {"role": "user", "content": "Bien, et toi? 日本語もOK"},
    ],
    "no_system_multi": [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "3+3?"},
    ],
}

TOOL_CONVERSATION = [
    {"role": "system", "content": "Use tools."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
    {"role": "tool", "content": "{\"temp\": 21}"},
]

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
