"""`shoal` with a stage that corrupts its activations: what verification must catch (run as a script)."""

import torch

from shoal.cli import app
from shoal.model.transformer import Transformer

honest = Transformer.forward


def corrupt(self, *args, **kwargs) -> torch.Tensor:
    return honest(self, *args, **kwargs) * 1.05  # 5% off: the next stage still runs, the answer drifts


Transformer.forward = corrupt

if __name__ == "__main__":
    app()
