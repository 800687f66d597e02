import hashlib
import json
import logging
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open

from shoal.model import fused, gemv
from shoal.model.config import ModelConfig
from shoal.model.errors import ModelFileError, UnsupportedModelError, WeightShapeError
from shoal.model.matmul import native_bfloat16, pack_loaded
from shoal.model.pages import move_weights
from shoal.model.transformer import Transformer
from shoal.model.tune import tune

log = logging.getLogger("shoal.model")

FUSED = {
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
FLOAT_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}  # safetensors' floating-point dtypes: bytes an element


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(config: ModelConfig, device: torch.device, dtype: torch.dtype | str | None) -> torch.dtype:
    """The dtype a model loads in: the one asked for (or its name); else bfloat16 on a GPU, and on a CPU a bfloat16
    checkpoint stays bfloat16 where the CPU multiplies it natively (half the memory; on an AMX Xeon a 0.5B model's
    engine ran 2.3x the float32 tokens/s), everything else float32."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise UnsupportedModelError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
        return DTYPES[dtype]
    if dtype is not None:
        return dtype
    native = device.type == "cpu" and config.checkpoint_dtype == "bfloat16" and native_bfloat16()
    return torch.bfloat16 if device.type == "cuda" or native else torch.float32


def load_model(path: str | Path, layers: tuple[int, int] | None = None,
               device: torch.device | str | None = None, dtype: torch.dtype | str | None = None,
               packed_copies: bool = True) -> Transformer:
    """Load layers [start, end) of an HF checkpoint, reading only the tensors that range needs. The dtype
    (or its name) is `resolve_dtype`'s. `packed_copies`: on a CPU, keep packed copies of weights for the
    batches they multiply faster, memory allowing (see model/tune.py)."""
    path = Path(path)
    config = ModelConfig.from_dir(path)
    device = torch.device(device) if device else default_device()
    dtype = resolve_dtype(config, device, dtype)
    start, end = layers or (0, config.num_hidden_layers)
    with torch.device("meta"):
        model = Transformer(config, start, end)
    model.to_empty(device=device).to(dtype)
    model.tie()
    if device.type == "cuda":
        # cuDNN's attention builds a plan for every new shape, and a decoding context grows a token a step: with it,
        # a 64-sequence decode step of a 0.5B model took 240-310 ms on an H100, against 20-70 ms without
        torch.backends.cuda.enable_cudnn_sdp(False)
    if device.type == "cpu":
        if dtype in fused.DTYPES:
            fused.warm(dtype)
        if dtype == torch.bfloat16:
            gemv.warm()
        choices = tune(model, packed_copies)
        log.debug("linear layers tuned", extra={"choices": {f"{o}x{i}": c for (o, i), c in choices.items()}})
    files = weight_files(path)
    with ExitStack() as stack:
        handles: dict[Path, object] = {}
        for name, param in model.named_parameters():
            specs = sources(model, name, param.shape)
            _copy(param, [_read(stack, handles, files, path, hf) for hf, _ in specs], specs)
    pack_loaded(model)
    if device.type == "cpu":
        move_weights(model)
    return model.eval()


def weight_files(path: Path) -> dict[str, Path]:
    """Map every tensor name to the safetensors file that holds it (sharded or single)."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ModelFileError(f"corrupt safetensors index {index}: {e}") from e
        for shard in sorted(set(weight_map.values())):
            if not (path / shard).is_file():
                raise ModelFileError(f"missing weights shard {path / shard} (listed in {index.name})")
        return {name: path / shard for name, shard in weight_map.items()}
    single = path / "model.safetensors"
    if not single.is_file():
        raise ModelFileError(f"missing weights: neither {single.name} nor {index.name} in {path}")
    try:
        with safe_open(single, framework="pt") as f:
            return dict.fromkeys(f.keys(), single)
    except Exception as e:
        raise ModelFileError(f"corrupt safetensors file {single}: {e}") from e


def sources(model: Transformer, name: str, shape: torch.Size) -> list[tuple[str, tuple[int, ...]]]:
    """The HF tensors (name, expected shape) whose concatenation along dim 0 fills parameter `name`."""
    if name.startswith("layers."):
        _, local, rest = name.split(".", 2)
        prefix = f"model.layers.{model.start + int(local)}."
        module, leaf = rest.rsplit(".", 1)
        parts = FUSED.get(module, (module,))
        rows = _split_rows(model.config, module, shape[0])
        return [(f"{prefix}{part}.{leaf}", (n, *shape[1:])) for part, n in zip(parts, rows, strict=True)]
    if name == "lm_head.weight" and model.config.tie_word_embeddings:
        return [("model.embed_tokens.weight", tuple(shape))]
    return [(name if name.startswith("lm_head") else f"model.{name}", tuple(shape))]


def _split_rows(config: ModelConfig, module: str, rows: int) -> list[int]:
    if module == "self_attn.qkv_proj":
        kv = config.num_key_value_heads * config.head_dim
        return [config.num_attention_heads * config.head_dim, kv, kv]
    if module == "mlp.gate_up_proj":
        return [rows // 2, rows // 2]
    return [rows]


def _read(stack: ExitStack, handles: dict, files: dict[str, Path], root: Path, name: str) -> torch.Tensor:
    if name not in files:
        raise ModelFileError(f"tensor {name} is missing from the checkpoint in {root}")
    file = files[name]
    try:
        if file not in handles:
            handles[file] = stack.enter_context(safe_open(file, framework="pt"))
        return handles[file].get_tensor(name)
    except Exception as e:
        raise ModelFileError(f"corrupt safetensors file {file} (reading {name}): {e}") from e


def _copy(param: torch.nn.Parameter, parts: list[torch.Tensor], specs: list[tuple[str, tuple[int, ...]]]) -> None:
    for tensor, (name, shape) in zip(parts, specs, strict=True):
        if tuple(tensor.shape) != shape:
            raise WeightShapeError(f"tensor {name} has shape {tuple(tensor.shape)} but the config implies {shape}")
    with torch.no_grad():
        param.copy_(parts[0] if len(parts) == 1 else torch.cat(parts))


def weights_fingerprint(path: str | Path) -> str:
    """Names one checkpoint: its config, every weight file's tensor header and 64 samples of its data, so only
    workers holding the same weights (whatever layers each loaded) join one route, without reading it all."""
    path = Path(path)
    h = hashlib.blake2b((path / "config.json").read_bytes(), digest_size=12)
    for file in sorted(set(weight_files(path).values())):
        total = file.stat().st_size
        with file.open("rb") as f:
            h.update(f.read(int.from_bytes(f.read(8), "little")))
            for i in range(64):
                f.seek(total * i // 64)
                h.update(f.read(4096))
    return h.hexdigest()


def layer_sizes(path: str | Path, dtype: torch.dtype | None = None) -> tuple[int, int, int]:
    """(layer count, bytes of one decoder layer on average, bytes of everything else), with floating-point tensors
    loaded in `dtype` (None: as stored on disk)."""
    path = Path(path)
    n_layers = ModelConfig.from_dir(path).num_hidden_layers
    in_layers = other = 0
    for file in sorted(set(weight_files(path).values())):
        with file.open("rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        for name, info in header.items():
            if name != "__metadata__":
                size = info["data_offsets"][1] - info["data_offsets"][0]
                if dtype is not None and info["dtype"] in FLOAT_BYTES:
                    size = size // FLOAT_BYTES[info["dtype"]] * dtype.itemsize
                in_layers, other = (in_layers + size, other) if ".layers." in name else (in_layers, other + size)
    return n_layers, in_layers // max(1, n_layers), other
