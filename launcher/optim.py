"""The optimizer a config asks for (`--optim.name sgd|adam|adamw`), from `torch.optim`."""

from __future__ import annotations

from typing import Any

import torch

from launcher.config import OptimConfig


def build_optimizer(params: Any, cfg: OptimConfig) -> torch.optim.Optimizer:
    if cfg.name == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay
        )
    if cfg.name == "adam":
        return torch.optim.Adam(
            params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay
        )
    return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)


def apply_hyperparameters(optimizer: torch.optim.Optimizer, cfg: OptimConfig) -> None:
    """This run's hyperparameters in every param group of an optimizer whose state was loaded from a checkpoint:
    a changed lr, momentum, weight decay or betas takes effect (the loaded param_groups would otherwise win,
    silently). `initial_lr` is the peak the schedule multiplies."""
    fresh = build_optimizer([torch.zeros(1, requires_grad=True)], cfg).param_groups[0]
    for group in optimizer.param_groups:
        group.update({k: v for k, v in fresh.items() if k != "params"}, initial_lr=cfg.lr)
