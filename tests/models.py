"""Small float64 test models covering the layer types ENGM must handle."""

from __future__ import annotations

import torch
from torch import nn


def mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 5))


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.GroupNorm(2, 4),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, stride=2),
        nn.Flatten(),
        nn.Linear(4 * 1 * 1, 5),
    )


class EmbeddingLayerNormModel(nn.Module):
    """Embedding -> LayerNorm -> mean-pool -> Linear, on integer tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(11, 6)
        self.norm = nn.LayerNorm(6)
        self.head = nn.Linear(6, 5)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.embedding(tokens)).mean(dim=1))


def inputs_for(name: str, batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and labels of the shape each model takes."""
    labels = torch.randint(0, 5, (batch,), generator=generator)
    if name == "embedding":
        return torch.randint(0, 11, (batch, 7), generator=generator), labels
    return torch.rand(batch, 1, 4, 4, generator=generator, dtype=torch.float64), labels


MODELS = {"mlp": mlp, "cnn": small_cnn, "embedding": EmbeddingLayerNormModel}


def build(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return MODELS[name]().double()
