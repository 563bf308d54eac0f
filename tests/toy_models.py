"""A small deterministic stand-in denoiser with VideoDenoiser's call signature, for math-level tests."""

from __future__ import annotations

import torch
from torch import nn


class ToyVideoDenoiser(nn.Module):
    """(B, C, T, H, W) -> same shape; uses the timestep and the caption so both matter."""

    def __init__(self, channels: int = 3, text_dim: int = 8, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv3d(channels, channels, kernel_size=3, padding=1)
        self.t_embed = nn.Embedding(1000, channels)
        self.text = nn.Linear(text_dim, channels)

    def forward(self, sample, timesteps, encoder_hidden_states, encoder_attention_mask=None):
        b = sample.shape[0]
        t = self.t_embed(timesteps.long().reshape(b)).reshape(b, -1, 1, 1, 1)
        c = self.text(encoder_hidden_states.mean(dim=1)).reshape(b, -1, 1, 1, 1)
        return self.conv(sample) + t + c
