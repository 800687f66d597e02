"""An HF model directory's tokenizer.json and chat template, giving the same ids and text as transformers."""

import dataclasses
import json
from collections.abc import Mapping
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar, Self

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as _BackendTokenizer

from shoal.model.errors import ChatTemplateError, ModelFileError

# transformers copies a message's reasoning between these names, since templates disagree on which one they read
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class _TemplateRaised(jinja2.TemplateError):
    """A template's own `raise_exception(...)` call, whose message is meant for the caller."""


def _raise_exception(message: str) -> None:
    raise _TemplateRaised(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes HTML characters, which would change the prompt
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _template_dict(*args: Any, **kwargs: Any) -> dict:
    # A plain function instead of the dict type, so templates can't reach the type's attributes
    return dict(*args, **kwargs)


class _Namespace(jinja2.utils.Namespace):
    """Jinja's namespace, refusing underscore names, which could reach CPython internals (as transformers does)."""

    def __init__(*args: Any, **kwargs: Any) -> None:
        self, attrs = args[0], dict(*args[1:], **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set underscore attribute {name!r}")


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; rendering just emits it."""

    tags: ClassVar[set[str]] = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


@lru_cache(maxsize=32)
def _compile(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_template_dict,
                       namespace=_Namespace)
    return env.from_string(source)


def _plain(value: Any) -> Any:
    """Rebuild template inputs from plain JSON types, as transformers does, so the sandbox sees no rich objects."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    # Subclasses (enums, numpy floats) are cut back to the base type; str(enum) would give "Cls.NAME"
    for base, convert in ((str, str.__str__), (int, int.__int__), (float, float.__float__)):
        if isinstance(value, base):
            return convert(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


def _prepare_message(message: Mapping) -> dict:
    if not isinstance(message, Mapping):
        raise TypeError(f"chat messages should be dicts, got {message!r}")
    # Keys set to None are dropped (OpenAI clients send content=None), and reasoning is aliased, as in transformers
    message = {k: v for k, v in _plain(message).items() if v is not None}
    reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
    if reasoning is not None:
        message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
    return message


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelFileError(f"cannot read {path}: {e}") from e


def _token_str(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _special_tokens(config: dict, legacy_map: dict) -> dict[str, str]:
    """bos/eos/... plus model-specific `*_token` entries, the variables transformers gives every chat template."""
    # Like transformers, special_tokens_map.json is only read for old configs, which lack added_tokens_decoder
    merged = config if "added_tokens_decoder" in config else {**config, **legacy_map}
    tokens = {key: token for key, value in merged.items()
              if key.endswith("_token") and (token := _token_str(value)) is not None}
    extra = merged.get("extra_special_tokens")
    if isinstance(extra, dict):
        tokens.update({k: t for k, v in extra.items() if (t := _token_str(v)) is not None})
    return tokens


def _chat_templates(path: Path, config: dict) -> dict[str, str]:
    """Templates by name; the .jinja files, when present, replace the ones in tokenizer_config.json."""
    templates = {}
    if (path / "chat_template.jinja").is_file():
        templates["default"] = (path / "chat_template.jinja").read_text(encoding="utf-8")
    extra_dir = path / "additional_chat_templates"
    if extra_dir.is_dir():
        templates.update({f.stem: f.read_text(encoding="utf-8") for f in sorted(extra_dir.glob("*.jinja"))})
    if templates:
        return templates
    stored = config.get("chat_template")
    if isinstance(stored, str):
        return {"default": stored}
    if isinstance(stored, list):
        return {t["name"]: t["template"] for t in stored}
    return {}


def _as_id_list(value: Any) -> list[int]:
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [int(v) for v in value]
    return []


class Tokenizer:
    """Encodes, decodes and renders chats for one model directory."""

    def __init__(self, backend: _BackendTokenizer, special_tokens: dict[str, str], chat_templates: dict[str, str],
                 eos_token_ids: list[int] | None = None, name: str = "tokenizer"):
        self.backend = backend
        self.special_tokens = special_tokens
        self.chat_templates = chat_templates
        self.name = name
        self.eos_token_ids = eos_token_ids or self._default_eos_ids()

    @classmethod
    def from_dir(cls, path: str | Path) -> Self:
        path = Path(path)
        tokenizer_file = path / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise ModelFileError(f"tokenizer file not found: {tokenizer_file}")
        try:
            backend = _BackendTokenizer.from_file(str(tokenizer_file))
        except Exception as e:
            raise ModelFileError(f"cannot load {tokenizer_file}: {e}") from e
        config = _read_json(path / "tokenizer_config.json")
        backend.encode_special_tokens = bool(config.get("split_special_tokens", False))
        eos_ids = (_as_id_list(_read_json(path / "generation_config.json").get("eos_token_id"))
                   or _as_id_list(_read_json(path / "config.json").get("eos_token_id")))
        special = _special_tokens(config, _read_json(path / "special_tokens_map.json"))
        return cls(backend, special, _chat_templates(path, config), eos_ids, name=str(path))

    def _default_eos_ids(self) -> list[int]:
        eos_id = self.token_to_id(self.eos_token) if self.eos_token is not None else None
        return [] if eos_id is None else [eos_id]

    @property
    def bos_token(self) -> str | None:
        return self.special_tokens.get("bos_token")

    @property
    def eos_token(self) -> str | None:
        return self.special_tokens.get("eos_token")

    @property
    def pad_token(self) -> str | None:
        return self.special_tokens.get("pad_token")

    @property
    def unk_token(self) -> str | None:
        return self.special_tokens.get("unk_token")

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (transformers' `len(tokenizer)`)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def chat_template(self, tools: list | None = None) -> str:
        """The template transformers would pick: "tool_use" when given tools and there is one, else "default"."""
        if tools is not None and "tool_use" in self.chat_templates:
            return self.chat_templates["tool_use"]
        if "default" in self.chat_templates:
            return self.chat_templates["default"]
        if self.chat_templates:
            raise ChatTemplateError(f"{self.name} has chat templates {sorted(self.chat_templates)} but none is "
                                    "named 'default'")
        raise ChatTemplateError(f"{self.name} has no chat template (no chat_template.jinja, and no chat_template "
                                "in tokenizer_config.json)")

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False,
                            tools: list | None = None, documents: list | None = None, **kwargs: Any) -> str:
        """Render `messages` as transformers' `apply_chat_template(..., tokenize=False)` does."""
        if not messages:
            raise ValueError("cannot apply a chat template to an empty conversation")
        source = self.chat_template(tools)
        prepared = [_prepare_message(m) for m in messages]
        variables = {**self.special_tokens, **_plain(kwargs)}
        try:
            return _compile(source).render(messages=prepared, tools=_plain(tools), documents=_plain(documents),
                                           add_generation_prompt=add_generation_prompt, **variables)
        except _TemplateRaised as e:
            raise ChatTemplateError(str(e)) from e
        except Exception as e:
            raise ChatTemplateError(f"chat template of {self.name} failed: {type(e).__name__}: {e}") from e

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs: Any) -> list[int]:
        # The template writes the BOS itself, so the post-processor must not add another
        text = self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, **kwargs)
        return self.encode(text, add_special_tokens=False)
