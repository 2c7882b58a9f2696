import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))  # benchmark helpers, for tests that use them


def randomise(model: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> torch.nn.Module:
    """Small random weights everywhere, the zero-initialised head included, so that steps change the grid.

    Norm gains stay near 1 so activations keep a realistic scale.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            is_gain = p.dim() == 1 and name.endswith("weight")
            p.copy_(1 + 0.1 * noise if is_gain else scale * noise)
    return model


@pytest.fixture
def randomise_model():
    return randomise


@pytest.fixture
def weights_dirs(tmp_path, monkeypatch):
    """An empty shipped-weights folder and VITCA_HOME, so tests never depend on the weights the project ships."""
    import vitca_cli.io.weights as weights_mod

    shipped, home = tmp_path / "shipped", tmp_path / "home"
    shipped.mkdir()
    monkeypatch.setattr(weights_mod, "SHIPPED_DIRS", (shipped,))
    monkeypatch.setenv("VITCA_HOME", str(home))
    return shipped, home
