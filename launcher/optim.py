"""The optimizer a config asks for (`--optim.name sgd|adam|adamw`), from `torch.optim`."""

from __future__ import annotations

from typing import Any

import torch

from launcher.config import OptimConfig
from launcher.errors import UserError


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


def apply_hyperparameters(optimizer: torch.optim.Optimizer, cfg: OptimConfig, groups: Any = None) -> None:
    """This run's hyperparameters in every param group of an optimizer whose state was loaded from a checkpoint:
    a changed lr, momentum, weight decay or betas takes effect (the loaded param_groups would otherwise win,
    silently). `groups` are this run's parameter groups (a task's `param_groups`), whose own settings (an lr, a
    weight decay) win over --optim's; `initial_lr`, each group's peak, is what the schedule multiplies."""
    fresh = build_optimizer(_placeholders(groups), cfg).param_groups
    if len(fresh) != len(optimizer.param_groups):
        raise UserError(
            f"the checkpoint's optimizer has {len(optimizer.param_groups)} parameter groups and this run's "
            f"{len(fresh)}; resume with the parameter groups it was saved with"
        )
    for group, new in zip(optimizer.param_groups, fresh, strict=True):
        group.update({k: v for k, v in new.items() if k != "params"}, initial_lr=new["lr"])


def _placeholders(groups: Any) -> list[dict[str, Any]]:
    """The groups' settings with one stand-in parameter each (building a throwaway optimizer must not touch the
    model's parameters)."""
    listed = [{"params": []}] if groups is None else list(groups)
    if listed and not isinstance(listed[0], dict):  # a plain iterable of parameters: one group
        listed = [{"params": listed}]
    return [{**g, "params": [torch.zeros(1, requires_grad=True)]} for g in listed]
