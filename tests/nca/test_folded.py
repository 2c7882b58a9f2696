"""The inference rewrite of the update rule (embedding folded into the first block's products) against the rule."""

import pytest
import torch
from conftest import randomise

from vitca_cli.nca.config import preset
from vitca_cli.nca.folded import FoldedUpdate, foldable
from vitca_cli.nca.model import CellularAutomaton


def photo_like(**kw) -> CellularAutomaton:
    """A randomised rule shaped like the photo model (no position encoding, mask channel, cells start at the input),
    with embedding biases and LayerNorm shifts far from 0, so a fold that dropped a term would show."""
    ca = randomise(CellularAutomaton(preset("cifar10", pos_encoding="none", mask_channel=True, **kw)), seed=3)
    with torch.no_grad():
        ca.rule.embed.bias.add_(0.7)
        ca.rule.blocks[0].norm1.bias.add_(0.3)
    return ca.eval()


def grid_and_choice(ca, seed=0):
    g = torch.Generator().manual_seed(seed)
    cells = ca.seed(torch.rand(2, 3, 20, 24, generator=g)).permute(0, 2, 3, 1)
    cells = cells + 0.3 * torch.randn(cells.shape, generator=g) * (torch.arange(cells.shape[-1]) >= 4)
    only = (torch.rand(2 * 20 * 24, generator=g) < 0.5).nonzero().squeeze(1)
    return cells.contiguous(), only


@pytest.mark.parametrize("heads", [4, 1])
def test_the_folded_update_equals_the_rule_in_float32(heads):
    ca = photo_like(heads=heads, embed=128 if heads == 4 else 32)
    cells, only = grid_and_choice(ca)
    with torch.no_grad():
        expected = ca.rule.update_cells(cells, only=only)
        folded = FoldedUpdate(ca.rule).update_cells(cells, only=only)
    assert expected.abs().max() > 0.05  # the update is not trivially small
    torch.testing.assert_close(folded, expected, atol=2e-5, rtol=1e-4)


def test_the_folded_update_under_bf16_autocast_stays_near_the_rule():
    ca = photo_like()
    cells, only = grid_and_choice(ca, seed=1)
    with torch.no_grad():
        exact = ca.rule.update_cells(cells, only=only)
        with torch.autocast("cpu", torch.bfloat16):
            rule_bf16 = ca.rule.update_cells(cells, only=only).float()
            folded_bf16 = FoldedUpdate(ca.rule).update_cells(cells, only=only).float()
    rule_err = (rule_bf16 - exact).abs().mean()
    folded_err = (folded_bf16 - exact).abs().mean()
    assert folded_err < 2 * rule_err + 1e-6, (folded_err, rule_err)


def test_what_does_not_fold_runs_the_rule_itself():
    ca = photo_like()
    cells, only = grid_and_choice(ca)
    folded = FoldedUpdate(ca.rule)
    with torch.no_grad():
        assert torch.equal(folded.update_cells(cells), ca.rule.update_cells(cells))  # every cell: the rule's path
    with torch.enable_grad():  # training keeps the rule's form (its gradients)
        assert torch.equal(folded.update_cells(cells, only=only), ca.rule.update_cells(cells, only=only))
    assert not foldable(CellularAutomaton(preset("fashion-mnist")).rule)  # vit position encoding
    assert not foldable(CellularAutomaton(preset("cifar10", pos_encoding="none", depth=2)).rule)
    with pytest.raises(ValueError):
        FoldedUpdate(CellularAutomaton(preset("fashion-mnist")).rule)
