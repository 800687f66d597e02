import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shoal.model.errors import ModelFileError, UnsupportedModelError

ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] = field(default_factory=dict)
    eos_token_ids: tuple[int, ...] = ()
    checkpoint_dtype: str | None = None  # the dtype the weights were saved in, as config.json names it

    @property
    def rope_type(self) -> str:
        return self.rope_scaling.get("rope_type", "default")

    @classmethod
    def from_dir(cls, path: str | Path) -> "ModelConfig":
        file = Path(path) / "config.json"
        if not file.is_file():
            raise ModelFileError(f"missing model config: {file}")
        try:
            raw = json.loads(file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ModelFileError(f"corrupt model config {file}: {e}") from e
        return cls.from_dict(raw)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "ModelConfig":
        model_type = _model_type(raw)
        if raw.get("hidden_act", "silu") != "silu":
            raise UnsupportedModelError(f"unsupported hidden_act {raw['hidden_act']!r}; only 'silu' is implemented")
        if raw.get("mlp_bias"):
            raise UnsupportedModelError("unsupported mlp_bias=true")
        theta, scaling = _rope(raw)
        heads = raw["num_attention_heads"]
        eos = raw.get("eos_token_id")
        return cls(
            model_type=model_type,
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"],
            num_hidden_layers=raw["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=raw.get("num_key_value_heads") or heads,
            head_dim=raw.get("head_dim") or raw["hidden_size"] // heads,
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            max_position_embeddings=raw.get("max_position_embeddings", 2048),
            tie_word_embeddings=raw.get("tie_word_embeddings", False),
            qkv_bias=model_type == "qwen2" or bool(raw.get("attention_bias", False)),
            o_bias=bool(raw.get("attention_bias", False)),
            qk_norm=model_type == "qwen3",
            sliding_window=_sliding_window(raw, model_type),
            rope_theta=theta,
            rope_scaling=scaling,
            eos_token_ids=tuple(eos if isinstance(eos, list) else [] if eos is None else [eos]),
            checkpoint_dtype=raw.get("dtype") or raw.get("torch_dtype"),
        )


def _model_type(raw: dict[str, Any]) -> str:
    model_type = raw.get("model_type")
    archs = raw.get("architectures") or []
    if model_type not in ARCHITECTURES:
        named = f"{archs[0]} (model_type {model_type!r})" if archs else f"model_type {model_type!r}"
        raise UnsupportedModelError(
            f"unsupported architecture {named}; supported: {', '.join(ARCHITECTURES)}"
        )
    return model_type


def _rope(raw: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    # transformers v5 writes rope_parameters; v4 checkpoints carry rope_theta and rope_scaling.
    params = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
    theta = float(params.pop("rope_theta", raw.get("rope_theta", 10000.0)))
    if "type" in params and "rope_type" not in params:
        params["rope_type"] = params.pop("type")
    kind = params.get("rope_type", "default")
    if kind not in ROPE_TYPES:
        raise UnsupportedModelError(f"unsupported rope scaling {kind!r}; supported: {', '.join(ROPE_TYPES)}")
    return theta, params


def _sliding_window(raw: dict[str, Any], model_type: str) -> int | None:
    if model_type == "mistral":
        return raw.get("sliding_window")
    if raw.get("use_sliding_window") or "sliding_attention" in (raw.get("layer_types") or []):
        raise UnsupportedModelError(f"unsupported sliding-window attention in a {model_type} model")
    return None
