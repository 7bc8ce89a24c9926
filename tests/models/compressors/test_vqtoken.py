"""VQToken: codebook usage, VQ losses, adaptive K, Selection contract, export in a fresh process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tokensieve.models.budget import num_keep
from tokensieve.models.compressors.vqtoken import VQToken, tokdense

from .conftest import build_visual

REPO = Path(__file__).resolve().parents[3]


def _clustered(B: int = 2, grid=(4, 4, 4), D: int = 16, n_valid=None, seed: int = 0, n_centres: int = 6):
    """Tokens drawn around a few centres, so a video genuinely uses several codes."""
    gen = torch.Generator().manual_seed(seed)
    t, h, w = grid
    centres = 3.0 * torch.randn(n_centres, D, generator=gen)
    pick = torch.randint(n_centres, (B, t * h * w), generator=gen)
    tokens = centres[pick] + 0.1 * torch.randn(B, t * h * w, D, generator=gen)
    return build_visual(B, grid, D, n_valid=n_valid, tokens=tokens)


def _model(D: int = 16, **kw) -> VQToken:
    torch.manual_seed(0)
    return VQToken(hidden_size=D, codebook_size=32, code_dim=8, d_model=16, num_heads=2, **kw)


def test_codebook_usage_more_than_one_code_per_video():
    visual = _clustered()
    model = _model()
    _, coding = model.compress(visual, budget=0.5)
    for b in range(visual.batch_size):
        used = coding.codes[b][visual.valid[b]].unique()
        assert used.numel() > 1
        assert coding.num_codes[b] > 1


def test_commitment_loss_finite_and_decreasing_on_fixed_batch():
    model = _model(decay=0.8)
    with torch.no_grad():  # the codebook is k-means-initialised on other data, as by an earlier batch
        model.eval().compress(_clustered(seed=11), budget=0.25)
    model.train()
    visual = _clustered(seed=1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    commits = []
    for _ in range(10):
        _, coding = model.compress(visual, budget=0.25)
        loss = 0.25 * coding.commitment + coding.reconstruction
        opt.zero_grad()
        loss.backward()
        opt.step()
        commits.append(coding.commitment.item())
    assert all(torch.isfinite(torch.tensor(commits)))
    assert commits[-1] < 0.1 * commits[0]
    assert max(commits[5:]) < commits[0]


@pytest.mark.parametrize("budget", [0.05, 0.25, 1.0, 3, 100])
def test_selection_honours_budget_with_padding(budget):
    visual = _clustered(B=3, n_valid=[64, 40, 5], seed=2)
    model = _model().eval()
    sel, coding = model.compress(visual, budget)
    k_max = sel.index.shape[1]
    assert sel.tokens.shape == (3, k_max, visual.tokens.shape[-1])
    kept = sel.num_kept
    for b in range(3):
        n = int(visual.valid[b].sum())
        k = int(kept[b])
        assert 1 <= k <= num_keep(n, budget)
        idx = sel.index[b, :k]
        assert torch.all(idx[1:] > idx[:-1]), "indices must be strictly ascending"
        assert bool(visual.valid[b, idx].all()), "representatives must be valid tokens"
        # representative = first occurrence of each slot in the token-hash map
        slots = coding.slots[b]
        assert set(slots[visual.valid[b]].tolist()) == set(range(k))
        assert bool((slots[~visual.valid[b]] == -1).all())
        for j in range(k):
            assert int((slots == j).nonzero()[0]) == int(idx[j])
    if sel.valid is not None:
        assert sel.valid.sum(1).tolist() == kept.tolist()


def test_adaptive_k_follows_codes_a_video_occupies():
    """A video made of two distinct tokens gets two code tokens, whatever the budget allows."""
    D = 16
    visual = _clustered(B=2, D=D, seed=3)
    model = _model(D).eval()
    model.compress(visual, budget=0.5)  # k-means initialisation on varied data
    static = torch.zeros(1, 64, D)
    static[:, 32:] = visual.tokens[0, 0]
    static[:, :32] = visual.tokens[0, 1] if not torch.equal(visual.tokens[0, 1], visual.tokens[0, 0]) else -visual.tokens[0, 0]
    sv = build_visual(1, (4, 4, 4), D, tokens=static)
    codes = model.codes(sv)[0]
    n_codes = codes.unique().numel()
    sel = model(sv, budget=0.5)
    assert int(sel.num_kept[0]) == n_codes <= 2


def test_merged_tokens_carry_gradient_and_start_at_code_means():
    visual = _clustered(seed=4)
    model = _model()
    sel, coding = model.compress(visual, budget=0.25)
    # W_out is zero-initialised: code tokens start as the per-code means of the original tokens
    for b in range(visual.batch_size):
        for j in range(int(sel.num_kept[b])):
            mean = visual.tokens[b][coding.slots[b] == j].mean(0)
            torch.testing.assert_close(sel.tokens[b, j], mean, atol=1e-5, rtol=1e-5)
    sel.tokens.sum().backward()
    assert model.out.weight.grad is not None and model.out.weight.grad.abs().sum() > 0


def test_eval_mode_does_not_move_the_codebook():
    visual = _clustered(seed=5)
    model = _model()
    model.compress(visual, budget=0.25)  # initialise
    model.eval()
    before = model.codebook.clone()
    model.compress(visual, budget=0.25)
    assert torch.equal(before, model.codebook)


def test_exported_tokenizer_reproduces_codes_in_a_fresh_process(tmp_path):
    visual = _clustered(B=2, n_valid=[64, 50], seed=6)
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(3):  # move the codebook (EMA) and the encoder away from their initial state
        _, coding = model.compress(visual, budget=0.25)
        (coding.commitment + coding.reconstruction).backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    with torch.no_grad():
        sel, coding = model.compress(visual, budget=0.25)
    model.save_pretrained(tmp_path / "vq")
    save_file({"codes": coding.codes, "tokens": sel.tokens.contiguous(), "index": sel.index, "input": visual.tokens.contiguous()}, str(tmp_path / "expected.safetensors"))
    script = f"""
import torch
from safetensors.torch import load_file
from tests.models.compressors.conftest import build_visual
from tokensieve.models.compressors.vqtoken import VQToken
exp = load_file({str(tmp_path / "expected.safetensors")!r})
model = VQToken.load({str(tmp_path / "vq")!r})
visual = build_visual(2, (4, 4, 4), 16, n_valid=[64, 50], tokens=exp["input"])
with torch.no_grad():
    sel, coding = model.compress(visual, budget=0.25)
assert torch.equal(coding.codes, exp["codes"]), "codes differ"
assert torch.equal(sel.index, exp["index"]), "indices differ"
torch.testing.assert_close(sel.tokens, exp["tokens"])
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("ok")


def test_tokdense():
    assert tokdense(60.0, 12.0) == 5.0
    with pytest.raises(ValueError):
        tokdense(50.0, 0)


def test_bad_budget_raises():
    model = _model().eval()
    with pytest.raises(ValueError):
        model(_clustered(), budget=0.0)
