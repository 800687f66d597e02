"""The transformer: HF config, a Llama-family decoder over any layer range, weights, tokenizer."""

from pathlib import Path

from shoal.model.config import ModelConfig
from shoal.model.transformer import Transformer
from shoal.model.weights import load_model

DEMO_PATH = Path(__file__).parent / "demo"

__all__ = ["DEMO_PATH", "ModelConfig", "Transformer", "load_model"]
