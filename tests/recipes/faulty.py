"""Test recipe whose build_model / build_datasets misbehave as `--fault` says, to check how the launcher reports it.

With the default `--fault none` it is a valid recipe on a tiny in-memory dataset.
"""

import sys
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.utils.data import TensorDataset

from launcher import DataConfig, Datasets, TrainConfig, UserError


@dataclass(kw_only=True)
class Config(TrainConfig):
    fault: Literal[
        "none",
        "model-raises",
        "model-user-error",
        "model-exits",
        "model-not-module",
        "datasets-raise",
        "datasets-wrong-type",
        "datasets-not-map-style",
    ] = "none"
    """Which misbehaviour to show."""


config = Config(max_epochs=1, data=DataConfig(batch_size=4, eval_batch_size=4, download=False))


def _layer_sizes(cfg: Config) -> tuple[int, int]:
    return {}["hidden-sizes"]  # the recipe's own bug, one frame below build_model


def build_model(cfg: Config) -> nn.Module:
    if cfg.fault == "model-raises":
        return nn.Linear(*_layer_sizes(cfg))
    if cfg.fault == "model-user-error":
        raise UserError("faulty recipe: no pretrained weights at /nowhere; pass --weights PATH")
    if cfg.fault == "model-exits":
        sys.exit(3)
    if cfg.fault == "model-not-module":
        return {"weight": torch.zeros(2, 4)}  # a state dict instead of the model
    return nn.Sequential(nn.Flatten(), nn.Linear(4, 2))


def build_datasets(cfg: Config) -> Datasets:
    data = TensorDataset(torch.zeros(8, 1, 2, 2), torch.zeros(8, dtype=torch.long))
    if cfg.fault == "datasets-raise":
        raise RuntimeError("faulty recipe: the dataset index is corrupt")
    if cfg.fault == "datasets-wrong-type":
        return data, data  # a tuple instead of Datasets
    if cfg.fault == "datasets-not-map-style":
        return Datasets(train=(sample for sample in data), eval=data)  # a generator: no len(), no indexing
    return Datasets(train=data, eval=data)
