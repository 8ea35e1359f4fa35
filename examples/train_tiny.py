#!/usr/bin/env python3
"""Train a tiny causal Transformer twice: attention by qkv, then by PyTorch.

The task is generated here: reverse a random sequence. A sample is
``a1 .. an SEP an .. a1`` with n = 8 tokens drawn from 15 symbols (vocab 16
with SEP); the model reads it left to right and is trained, with the usual
next-token loss, only on the positions after SEP (the reversed half), so
chance is ln(15) ~ 2.7 nats per token and a model that learned the task is
near 0. It has to attend far back (the token it outputs at step i sits
2i + 1 positions behind), which a model without working attention cannot do.

The model is plain PyTorch (nn.Embedding, nn.Linear, nn.LayerNorm, a GELU
MLP, pre-norm residual blocks) with its own attention module that projects
q, k, v and calls ``attention_fn(q, k, v, is_causal=True)`` on
[batch, heads, seq, head_dim] tensors. The same model, from the same seed and
on the same batches, is trained once with ``qkv.torch.scaled_dot_product_attention``
and once with PyTorch's attention (``torch.nn.functional.scaled_dot_product_attention``
where this torch has it, otherwise the math formula softmax(q k^T / sqrt(d)) v
with a causal mask), and the two loss curves are printed side by side. Both runs do
the same arithmetic up to the order of the additions inside attention, so the
curves agree to float32 rounding (relative differences ~1e-7 at every step of
the default run; loss 2.92 -> ~0.02 by step 50 -> ~0.002 at step 300).

Usage: python3 examples/train_tiny.py [--steps 300] [--batch 64] [--seed 0] [--threads 1] [--quiet]
(needs qkv installed: ``pip install .``).
"""
from __future__ import annotations

import argparse
import math
import time
from typing import Callable, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

VOCAB = 16          # symbols 0..14, SEP = 15
SEP = VOCAB - 1
N_TOKENS = 8        # sequence length to reverse
SEQ = 2 * N_TOKENS + 1

AttentionFn = Callable[..., torch.Tensor]


def torch_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    is_causal: bool = False) -> torch.Tensor:
    """PyTorch's attention: F.scaled_dot_product_attention, or the math formula on torch < 2.0."""
    if hasattr(F, "scaled_dot_product_attention"):
        return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if is_causal:
        keep = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def qkv_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  is_causal: bool = False) -> torch.Tensor:
    """qkv's attention (forward and backward), imported on first use."""
    import qkv.torch
    return qkv.torch.scaled_dot_product_attention(q, k, v, is_causal=is_causal)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, attention_fn: AttentionFn):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.attention_fn = attention_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        # [b, t, 3, heads, hd] -> three [b, heads, t, hd] views (strided, not copied).
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = self.attention_fn(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, attention_fn: AttentionFn):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads, attention_fn)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyTransformer(nn.Module):
    def __init__(self, attention_fn: AttentionFn, dim: int = 64, heads: int = 4, layers: int = 2):
        super().__init__()
        self.tok = nn.Embedding(VOCAB, dim)
        self.pos = nn.Embedding(SEQ, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, attention_fn) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, VOCAB)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def make_batch(batch: int, gen: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
    """(inputs [batch, SEQ - 1], targets [batch, SEQ - 1]); target -100 = not scored."""
    a = torch.randint(0, SEP, (batch, N_TOKENS), generator=gen)
    seq = torch.cat([a, torch.full((batch, 1), SEP), a.flip(1)], dim=1)
    inputs, targets = seq[:, :-1], seq[:, 1:].clone()
    targets[:, :N_TOKENS] = -100  # score only the reversed half (predicted from SEP on)
    return inputs, targets


def train(attention_fn: AttentionFn, steps: int = 300, seed: int = 0, batch: int = 64,
          lr: float = 3e-3, threads: Optional[int] = None,
          log: Optional[Callable[[int, float], None]] = None) -> Tuple[nn.Module, List[float]]:
    """Trains a fresh model; returns it and the training loss of every step."""
    if threads is not None:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    model = TinyTransformer(attention_fn)
    gen = torch.Generator().manual_seed(seed + 1)  # the data: the same batches for every run
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(  # linear warmup, cosine decay to 0
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    losses = []
    for step in range(steps):
        inputs, targets = make_batch(batch, gen)
        logits = model(inputs)
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if log is not None:
            log(step, losses[-1])
    return model, losses


def run(attention_fn: AttentionFn, steps: int = 300, seed: int = 0, batch: int = 64,
        lr: float = 3e-3, threads: Optional[int] = None) -> List[float]:
    """The training loss of every step of :func:`train` (what the test compares)."""
    return train(attention_fn, steps=steps, seed=seed, batch=batch, lr=lr, threads=threads)[1]


@torch.no_grad()
def accuracy(model: nn.Module, seed: int = 1234, samples: int = 2000) -> Tuple[float, float]:
    """(token accuracy, exact-sequence accuracy) of greedy next-token prediction on
    fresh samples (teacher-forced: the prefix is the true one)."""
    model.eval()
    inputs, targets = make_batch(samples, torch.Generator().manual_seed(seed))
    pred = model(inputs).argmax(-1)
    scored = targets != -100
    right = (pred == targets) | ~scored
    model.train()
    token = (right & scored).sum().item() / scored.sum().item()
    return token, right.all(dim=1).float().mean().item()


@torch.no_grad()
def generate_reversal(model: nn.Module, seed: int = 99, samples: int = 500) -> float:
    """Exact-sequence accuracy when the model writes the reversal itself (greedy, token
    by token, each prediction fed back)."""
    model.eval()
    inputs, _ = make_batch(samples, torch.Generator().manual_seed(seed))
    seq = inputs[:, :N_TOKENS + 1]
    for _ in range(N_TOKENS):
        seq = torch.cat([seq, model(seq)[:, -1:].argmax(-1)], dim=1)
    model.train()
    return (seq[:, N_TOKENS + 1:] == inputs[:, :N_TOKENS].flip(1)).all(dim=1).float().mean().item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch.set_num_threads, which qkv follows (default 1: this model is too "
                    "small for a second thread to pay off, and on a busy machine it costs more "
                    "than it gives)")
    ap.add_argument("--every", type=int, default=0,
                    help="print the losses every k steps (default: steps/12)")
    ap.add_argument("--quiet", action="store_true", help="print only the summary")
    a = ap.parse_args()

    torch.set_num_threads(a.threads)
    try:  # cheap on CPU; makes reruns of the same run bitwise equal
        torch.use_deterministic_algorithms(True)
    except AttributeError:
        pass
    import qkv
    print(f"torch {torch.__version__}, qkv {qkv.__version__}; reverse {N_TOKENS} tokens of "
          f"{SEP} symbols; {a.steps} steps of batch {a.batch}, seed {a.seed}, "
          f"{a.threads} thread(s); chance loss ln({SEP}) = {math.log(SEP):.3f}")
    every = a.every or max(1, a.steps // 12)
    torch_name = ("F.scaled_dot_product_attention" if hasattr(F, "scaled_dot_product_attention")
                  else "the math formula")
    results = {}
    for name, fn in (("qkv", qkv_attention), ("torch", torch_attention)):
        t0 = time.perf_counter()
        model, losses = train(fn, steps=a.steps, seed=a.seed, batch=a.batch)
        seconds = time.perf_counter() - t0
        results[name] = (losses, accuracy(model), generate_reversal(model), seconds)
    lq, lt = results["qkv"][0], results["torch"][0]
    if not a.quiet:
        print(f"\nloss per step (qkv: qkv.torch.scaled_dot_product_attention; torch: {torch_name})")
        print(f"{'step':>6} {'qkv':>10} {'torch':>10} {'rel. diff':>10}")
        for s in list(range(0, a.steps, every)) + ([a.steps - 1] if (a.steps - 1) % every else []):
            print(f"{s + 1:>6} {lq[s]:>10.5f} {lt[s]:>10.5f} {abs(lq[s] - lt[s]) / lt[s]:>10.2e}")
    tail = max(1, a.steps // 20)
    print(f"\n{'':>6} {'final loss':>11} {'(mean last ' + str(tail) + ')':>16} {'token acc':>10} "
          f"{'seq acc':>8} {'generated':>10} {'time':>7}")
    for name, (losses, (tok, seq), gen, seconds) in results.items():
        print(f"{name:>6} {losses[-1]:>11.5f} {sum(losses[-tail:]) / tail:>16.5f} {tok:>10.4f} "
              f"{seq:>8.4f} {gen:>10.4f} {seconds:>6.1f}s")


if __name__ == "__main__":
    main()
