"""examples/train_tiny.py trains the same as with PyTorch's attention.

The example's 2-layer causal Transformer is trained for STEPS steps (batch 64, seed 0,
one thread) on its sequence-reversal task twice from the same seed on the same batches:
attention by qkv.torch.scaled_dot_product_attention, then by PyTorch's
(F.scaled_dot_product_attention on torch >= 2.0, the math formula on torch 1.13).

Measured (torch 1.13 and torch 2.x alike, 100 steps): loss 2.92 at step 1 (chance is
ln 15 = 2.71), 0.0165 at step 100 for both attentions, relative difference between the
curves at most ~1e-6 at any step (float32 rounding: the two differ only in the order of
the additions inside attention); seeds 1..3 end at 0.018 .. 0.021; ~5 s a run.

Asserted, with margin:
- the final qkv loss is within 2% (relative) of PyTorch's, and so is every step's;
- both final losses are below FINAL_LOSS_MAX = 0.05 (2.5x the worst seed measured);
- the loss went down substantially: it starts above 2.5 (untrained, ~chance) and ends
  more than 50x lower;
- the qkv-trained model reverses held-out sequences (exact-sequence accuracy > 0.95);
- a rerun with qkv gives bitwise the same losses (determinism).
"""
from __future__ import annotations

import importlib.util
import pathlib

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("qkv.torch")

STEPS = 100
FINAL_LOSS_MAX = 0.05
EXAMPLE = pathlib.Path(__file__).resolve().parents[2] / "examples" / "train_tiny.py"


def _load_example():
    spec = importlib.util.spec_from_file_location("train_tiny", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tt = _load_example()


@pytest.fixture(scope="module")
def trained():
    saved = torch.get_num_threads()
    try:
        model, qkv_losses = tt.train(tt.qkv_attention, steps=STEPS, seed=0, threads=1)
        torch_losses = tt.run(tt.torch_attention, steps=STEPS, seed=0, threads=1)
    finally:
        torch.set_num_threads(saved)
    return model, qkv_losses, torch_losses


def test_final_loss_matches_torch(trained):
    _, lq, lt = trained
    assert len(lq) == len(lt) == STEPS
    rel = abs(lq[-1] - lt[-1]) / lt[-1]
    assert rel <= 0.02, f"final loss qkv {lq[-1]:.6f} vs torch {lt[-1]:.6f} ({rel:.2%})"


def test_every_step_matches_torch(trained):
    _, lq, lt = trained
    worst = max(range(STEPS), key=lambda s: abs(lq[s] - lt[s]) / lt[s])
    rel = abs(lq[worst] - lt[worst]) / lt[worst]
    assert rel <= 0.02, \
        f"step {worst + 1}: qkv {lq[worst]:.6f} vs torch {lt[worst]:.6f} ({rel:.2%})"


def test_task_is_learned(trained):
    _, lq, lt = trained
    assert lq[0] > 2.5 and lt[0] > 2.5, "an untrained model should be near chance (ln 15 = 2.71)"
    for name, losses in (("qkv", lq), ("torch", lt)):
        assert losses[-1] < FINAL_LOSS_MAX, f"{name}: final loss {losses[-1]:.4f}"
        assert losses[-1] < losses[0] / 50, f"{name}: {losses[0]:.3f} -> {losses[-1]:.4f}"


def test_qkv_trained_model_reverses_sequences(trained):
    model = trained[0]
    token_acc, seq_acc = tt.accuracy(model, samples=500)
    assert token_acc > 0.99 and seq_acc > 0.95, (token_acc, seq_acc)
    assert tt.generate_reversal(model, samples=200) > 0.95


def test_qkv_training_is_deterministic():
    saved = torch.get_num_threads()
    try:
        a = tt.run(tt.qkv_attention, steps=8, seed=5, threads=1)
        b = tt.run(tt.qkv_attention, steps=8, seed=5, threads=1)
    finally:
        torch.set_num_threads(saved)
    assert a == b
