import json
import shutil

import pytest
import torch

from shoal.model import ModelConfig, load_model, weights
from shoal.model.errors import ModelFileError, UnsupportedModelError, WeightShapeError


@pytest.fixture
def llama_dir(hf_models, tmp_path):
    _, path = hf_models("llama")
    dst = tmp_path / "m"
    shutil.copytree(path, dst)
    return dst


def edit_config(path, **changes):
    file = path / "config.json"
    raw = json.loads(file.read_text())
    raw.update(changes)
    file.write_text(json.dumps(raw))


def test_sharded_checkpoint_loads_same_weights(hf_models, tmp_path):
    hf, path = hf_models("qwen3")
    hf.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 2
    sharded, single = load_model(tmp_path, device="cpu"), load_model(path, device="cpu")
    for (name, a), (_, b) in zip(sharded.named_parameters(), single.named_parameters(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("native", [True, False], ids=["bfloat16-cpu", "other-cpu"])
def test_a_bfloat16_checkpoint_stays_bfloat16_on_a_cpu_only_where_the_cpu_has_bfloat16_instructions(
        llama_dir, monkeypatch, native):
    monkeypatch.setattr(weights, "native_bfloat16", lambda: native)
    assert load_model(llama_dir, device="cpu").dtype == torch.float32  # a float32 checkpoint
    for named in (dict(dtype="bfloat16"), dict(dtype=None, torch_dtype="bfloat16")):  # transformers' new and old key
        edit_config(llama_dir, **named)
        assert load_model(llama_dir, device="cpu").dtype == (torch.bfloat16 if native else torch.float32)
    assert load_model(llama_dir, device="cpu", dtype="float32").dtype == torch.float32


def test_layer_sizes_count_the_bytes_of_the_dtype_the_layers_load_in(llama_dir):
    model = load_model(llama_dir, device="cpu", dtype="float32")
    n, per_layer, other = weights.layer_sizes(llama_dir)  # a float32 checkpoint: as stored
    assert n == model.num_layers and per_layer * n + other == sum(p.nbytes for p in model.parameters())
    assert weights.layer_sizes(llama_dir, torch.bfloat16) == (n, per_layer // 2, other // 2)
    assert weights.layer_sizes(llama_dir, torch.float32) == (n, per_layer, other)


def test_layer_range_holds_only_its_tensors(hf_models):
    _, path = hf_models("llama")
    whole, middle = load_model(path, device="cpu"), load_model(path, (1, 3), "cpu")
    names = {n for n, _ in middle.named_parameters()}
    assert not any(n.startswith(("embed_tokens", "norm", "lm_head")) for n in names)
    per_layer = sum(p.numel() for p in whole.layers[0].parameters())
    assert sum(p.numel() for p in middle.parameters()) == 2 * per_layer
    torch.testing.assert_close(middle.layers[0].mlp.down_proj.weight, whole.layers[1].mlp.down_proj.weight)


def test_tied_head_on_last_range_comes_from_embeddings(hf_models):
    hf, path = hf_models("qwen2")
    last = load_model(path, (2, 4), "cpu")
    assert torch.equal(last.lm_head.weight, hf.model.embed_tokens.weight)


def test_missing_config(tmp_path):
    with pytest.raises(ModelFileError, match=r"missing model config: .*config\.json"):
        load_model(tmp_path)


def test_missing_weights(llama_dir):
    (llama_dir / "model.safetensors").unlink()
    with pytest.raises(ModelFileError, match=r"missing weights: neither model\.safetensors nor"):
        load_model(llama_dir)


def test_missing_shard(hf_models, tmp_path):
    hf, _ = hf_models("llama")
    hf.save_pretrained(tmp_path, max_shard_size="40KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(ModelFileError, match=f"missing weights shard .*{shard.name}"):
        load_model(tmp_path)


@pytest.mark.parametrize("arch,model_type", [("GPT2LMHeadModel", "gpt2"), ("MambaForCausalLM", "mamba")])
def test_unsupported_architecture_is_named(llama_dir, arch, model_type):
    edit_config(llama_dir, architectures=[arch], model_type=model_type)
    with pytest.raises(UnsupportedModelError, match=f"unsupported architecture {arch} .*{model_type}"):
        load_model(llama_dir)


def test_unsupported_rope_scaling_is_named(llama_dir):
    edit_config(llama_dir, rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4})
    with pytest.raises(UnsupportedModelError, match="unsupported rope scaling 'yarn'"):
        load_model(llama_dir)


def test_v4_style_rope_fields_are_read():
    config = ModelConfig.from_dict(dict(
        model_type="llama", vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
        num_attention_heads=2, rope_theta=500000.0, rope_scaling={"type": "linear", "factor": 4.0}))
    assert config.rope_theta == 500000.0 and config.rope_type == "linear"


def test_shape_mismatch_names_the_tensor(llama_dir):
    edit_config(llama_dir, intermediate_size=100)
    with pytest.raises(WeightShapeError, match=r"tensor model\.layers\.0\.mlp\.gate_proj\.weight has shape"):
        load_model(llama_dir)


def test_corrupt_file(llama_dir):
    weights = llama_dir / "model.safetensors"
    weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(ModelFileError, match="corrupt safetensors file"):
        load_model(llama_dir)


def test_truncated_file(llama_dir):
    weights = llama_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-5000])
    with pytest.raises(ModelFileError, match="corrupt safetensors file"):
        load_model(llama_dir)


def test_corrupt_config(llama_dir):
    (llama_dir / "config.json").write_text("{ nope")
    with pytest.raises(ModelFileError, match="corrupt model config"):
        load_model(llama_dir)


def test_invalid_layer_range(hf_models):
    _, path = hf_models("llama")
    with pytest.raises(ValueError, match=r"invalid layer range \[3, 9\) for a model of 4 layers"):
        load_model(path, (3, 9))
