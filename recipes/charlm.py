"""A character-level GPT on a text file: next-character prediction, loss per character.

    python -m launcher.train recipes/charlm.py --data.path ../shared/data/tinyshakespeare/input.txt
    python -m launcher.train recipes/charlm.py --phase predict --weights runs/RUN/best.safetensors \
        --sample.prompt "ROMEO:" --sample.characters 500          # prints generated text

The defaults are nanoGPT's CPU configuration of its shakespeare_char example (4 layers, 4 heads, 128 wide, 64
characters of context, batch 12, 2,000 steps of AdamW warmed up over 100 steps and decayed by cosine to a tenth,
weight decay 0.1 on matrices only, gradient clipping at 1, no dropout) on the same 90/10 split of the text, with
one change of no cost: a peak lr of 2e-3 instead of 1e-3 (measured here: 1e-3 reaches 1.898, 1.5e-3 1.854, 2e-3
1.808). nanoGPT reports a validation loss of 1.88 for its configuration. Each step takes 12 random windows of the
training text (every position is a window start, shuffled without replacement). The validation loss is exact:
the held-out tenth is cut into non-overlapping windows and every character of them counts once.

Reached (tiny-shakespeare, 1,115,394 characters; 2-core Intel Xeon VM with AVX-512, no GPU; `python -m
benchmarks.charlm --anchor`): validation loss 1.808 (2.61 bits per character) after 2,000 steps, 84 s for the
whole command, of which 69 s of training steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from launcher import (
    CheckpointConfig,
    DataConfig,
    Datasets,
    Loss,
    OptimConfig,
    ScheduleConfig,
    Task,
    TrainConfig,
    UserError,
    Windows,
    no_decay_groups,
    output_tensor,
)


@dataclass(kw_only=True)
class TextData(DataConfig):
    path: Path = Path("input.txt")
    """The text file (UTF-8); its distinct characters are the vocabulary."""
    val_fraction: float = 0.1
    """The last share of the text held out for validation (nanoGPT: 0.1)."""
    block_size: int = 64
    """Characters of context per window."""


@dataclass(kw_only=True)
class ModelConfig:
    layers: int = 4
    """Transformer blocks."""
    heads: int = 4
    """Attention heads per block."""
    width: int = 128
    """Embedding width."""
    dropout: float = 0.0
    """Dropout on attention weights, residual branches and embeddings."""


@dataclass(kw_only=True)
class SampleConfig:
    prompt: str = "\n"
    """Text the generation starts from (--phase predict)."""
    characters: int = 500
    """Characters to generate."""
    temperature: float = 0.8
    """Softmax temperature: below 1 is more conservative, above 1 more random."""
    top_k: int = 40
    """Sample among the k likeliest characters only (0: all)."""


@dataclass(kw_only=True)
class Config(TrainConfig):
    data: TextData = field(default_factory=TextData)
    model: ModelConfig = field(default_factory=ModelConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)


config = Config(
    max_steps=2000,
    eval_every_steps=250,
    eval_every_epochs=0,
    key_metric="loss",
    key_metric_mode="min",
    data=TextData(batch_size=12, eval_batch_size=256, download=False),
    optim=OptimConfig(name="adamw", lr=2e-3, betas=(0.9, 0.99), weight_decay=0.1, grad_clip_norm=1.0),
    schedule=ScheduleConfig(
        warmup="linear", warmup_steps=100, warmup_start_factor=0.01, decay="cosine", min_lr_factor=0.1
    ),
    checkpoint=CheckpointConfig(every_steps=500, every_epochs=0),
)


# ---- the text --------------------------------------------------------------------------------------------------
def read_text(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"--data.path {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"--data.path {path}: cannot read it as UTF-8 text ({exc})") from None
    if len(set(text)) < 2:
        raise UserError(f"--data.path {path}: needs a text of at least two distinct characters")
    return text


def vocabulary(text: str) -> list[str]:
    return sorted(set(text))


def build_datasets(cfg: Config) -> Datasets:
    d = cfg.data
    text = read_text(d.path)
    index = {c: i for i, c in enumerate(vocabulary(text))}
    tokens = torch.tensor([index[c] for c in text], dtype=torch.int64)
    cut = int(len(tokens) * (1 - d.val_fraction))
    if min(cut, len(tokens) - cut) <= d.block_size:
        raise UserError(
            f"--data.path {d.path}: too short for --data.block-size {d.block_size} in both splits"
        )
    return Datasets(
        train=Windows(tokens[:cut], d.block_size),
        eval=Windows(tokens[cut:], d.block_size, stride=d.block_size),
    )


# ---- the model -------------------------------------------------------------------------------------------------
class SelfAttention(nn.Module):
    def __init__(self, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.proj = nn.Linear(width, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = (
            y.view(b, t, self.heads, c // self.heads).transpose(1, 2) for y in self.qkv(x).split(c, dim=2)
        )
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


class Block(nn.Module):
    def __init__(self, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width, bias=False), nn.LayerNorm(width, bias=False)
        self.attention = SelfAttention(width, heads, dropout)
        self.mlp = nn.Sequential(
            nn.Linear(width, 4 * width, bias=False), nn.GELU(), nn.Linear(4 * width, width, bias=False)
        )
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attention(self.norm1(x)))
        return x + self.drop(self.mlp(self.norm2(x)))


class GPT(nn.Module):
    """nanoGPT's model: learned positions, pre-norm blocks, the output layer tied to the token embedding. The
    vocabulary travels with the weights (a buffer of code points), so a checkpoint can generate text alone."""

    def __init__(self, vocab: list[str], block_size: int, m: ModelConfig) -> None:
        super().__init__()
        if m.width % m.heads:
            raise UserError(f"--model.width {m.width} must be a multiple of --model.heads {m.heads}")
        self.block_size = block_size
        self.register_buffer("vocab", torch.tensor([ord(c) for c in vocab]))
        self.tokens = nn.Embedding(len(vocab), m.width)
        self.positions = nn.Embedding(block_size, m.width)
        self.drop = nn.Dropout(m.dropout)
        self.blocks = nn.Sequential(*(Block(m.width, m.heads, m.dropout) for _ in range(m.layers)))
        self.norm = nn.LayerNorm(m.width, bias=False)
        self.head = nn.Linear(m.width, len(vocab), bias=False)
        self.head.weight = self.tokens.weight
        for name, p in self.named_parameters():
            if p.dim() >= 2:  # GPT-2's init: N(0, 0.02), residual projections scaled down by depth
                std = (
                    0.02 / math.sqrt(2 * m.layers) if name.endswith(("proj.weight", "mlp.2.weight")) else 0.02
                )
                nn.init.normal_(p, 0.0, std)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        x = self.drop(self.tokens(idx) + self.positions(torch.arange(t, device=idx.device)))
        return self.head(self.norm(self.blocks(x)))


def build_model(cfg: Config) -> nn.Module:
    vocab = vocabulary(read_text(cfg.data.path)) if cfg.phase != "predict" else _vocab_of_weights(cfg)
    return GPT(vocab, cfg.data.block_size, cfg.model)


def _vocab_of_weights(cfg: Config) -> list[str]:
    from launcher.checkpoint.weights import read_weights

    return [chr(c) for c in read_weights(cfg.weights)["vocab"].tolist()]


# ---- the task --------------------------------------------------------------------------------------------------
class NextToken(Task):
    """Cross-entropy per token, normalised by the tokens that count (targets equal to `ignore_index`, such as
    padding, do not); validation loss, bits per character and perplexity."""

    metric_names = ("loss", "bits_per_char", "perplexity")

    def __init__(self, ignore_index: int = -100) -> None:
        self.ignore_index = ignore_index

    def _sum(self, model, batch) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, targets = batch
        logits = output_tensor(model(inputs))
        total = F.cross_entropy(
            logits.flatten(0, 1), targets.flatten(), ignore_index=self.ignore_index, reduction="sum"
        )
        return total, (targets != self.ignore_index).sum()

    def loss(self, model, batch) -> Loss:
        total, tokens = self._sum(model, batch)
        return Loss(total, count=tokens)

    def evaluate(self, model, batch) -> dict[str, torch.Tensor]:
        total, tokens = self._sum(model, batch)
        return {"loss": total, "tokens": tokens}

    def metrics(self, t: dict[str, torch.Tensor]) -> dict[str, float]:
        loss = t["loss"].item() / t["tokens"].item()
        return {"loss": loss, "bits_per_char": loss / math.log(2), "perplexity": math.exp(loss)}

    def param_groups(self, model: nn.Module, optim: OptimConfig) -> list[dict]:
        return no_decay_groups(model, optim)


def build_task(cfg: Config) -> Task:
    return NextToken()


# ---- sampling --------------------------------------------------------------------------------------------------
def predict(model: GPT, cfg: Config, run_dir: Path) -> dict:
    """Print `--sample.characters` characters generated from `--sample.prompt`."""
    s = cfg.sample
    vocab = [chr(c) for c in model.vocab.tolist()]
    index = {c: i for i, c in enumerate(vocab)}
    if unknown := sorted({c for c in s.prompt if c not in index}):
        raise UserError(f"--sample.prompt has characters the model never saw: {unknown}")
    device = model.vocab.device
    idx = torch.tensor([[index[c] for c in s.prompt]], device=device)
    for _ in range(s.characters):
        logits = model(idx[:, -model.block_size :])[:, -1].float() / max(s.temperature, 1e-6)
        if s.top_k:
            kth = logits.topk(min(s.top_k, logits.shape[-1])).values[:, -1:]
            logits = logits.masked_fill(logits < kth, -math.inf)
        idx = torch.cat([idx, torch.multinomial(logits.softmax(-1), 1)], dim=1)
    text = "".join(vocab[i] for i in idx[0].tolist())
    print(text)
    (run_dir / "sample.txt").write_text(text)
    return {"sample": text}


def fsdp_units(model: GPT) -> list[nn.Module]:
    """What --parallel.strategy fsdp shards one by one: the transformer blocks (the embeddings, tied to the output
    layer, stay with the root)."""
    return list(model.blocks)
