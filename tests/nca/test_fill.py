"""The push-pull fill that a ``fill`` model's missing pixels start from."""

import torch

from vitca_cli.nca.config import CAConfig
from vitca_cli.nca.fill import push_pull_fill
from vitca_cli.nca.model import CellularAutomaton


def test_the_fill_keeps_known_pixels_and_fills_smoothly_between_them():
    gen = torch.Generator().manual_seed(0)
    image = torch.rand(2, 3, 37, 50, generator=gen)
    known = (torch.rand(2, 1, 37, 50, generator=gen) > 0.6).float()
    known[:, :, 10:30, 5:40] = 0  # a hole far wider than one pixel
    filled = push_pull_fill(image * known, known)
    assert torch.equal(filled[known.expand_as(image).bool()], image[known.expand_as(image).bool()])
    assert filled.min() >= image.min() and filled.max() <= image.max()  # means of known pixels, never beyond them
    flat = torch.full((1, 3, 37, 50), 0.3)
    assert torch.allclose(push_pull_fill(flat * known[:1], known[:1]), flat)
    ramp = torch.linspace(0, 1, 64).expand(1, 3, 64, 64).contiguous()  # left to right
    hole = torch.ones(1, 1, 64, 64)
    hole[..., 20:44, 20:44] = 0
    err = (push_pull_fill(ramp * hole, hole) - ramp)[..., 20:44, 20:44].abs().mean()
    assert err < 0.05  # a smooth guess, not 0.5 or a copy of the border
    assert torch.equal(push_pull_fill(image, torch.ones(1, 1, 37, 50)), image)  # nothing missing
    assert torch.allclose(push_pull_fill(image, torch.zeros(1, 1, 37, 50)), torch.full_like(image, 0.5))


def test_a_fill_model_starts_its_missing_outputs_at_the_fill_and_denoises_as_input_does():
    cfg = CAConfig(channels=3, embed=16, heads=2, mlp=16, hidden=4, mask_channel=True, cell_init="fill")
    ca = CellularAutomaton(cfg)
    image = torch.rand(1, 3, 28, 28)
    known = torch.ones(1, 1, 28, 28)
    known[..., 8:20, 8:20] = 0
    z = ca.seed(image * known, known=known)
    assert torch.allclose(ca.output(z), push_pull_fill(image * known, known))
    assert torch.equal(ca.output(ca.seed(image)), image)  # no mask: the outputs start at the input, as "input"
    given = torch.rand(1, 3, 28, 28)
    assert torch.equal(ca.output(ca.seed(image * known, known=known, start=given)), given)
