"""Linear probing, the paper's representation test (reference §5): how linearly separable are the CA's cells?

The trained CA is frozen and run ``iters`` steps on **unmasked** images; each image's feature is its hidden
channels averaged over the grid (Ch numbers, e.g. 32). A linear classifier is trained on those features and its
top-1 test accuracy is compared with a linear classifier on the raw pixels trained exactly the same way: same
standardisation (train-set mean and std), multinomial logistic regression fitted with full-batch L-BFGS, and
the same model selection (the L2 strength with the best top-1 on a held-out 10% of the training images).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from vitca_cli import tables
from vitca_cli.nca.rollout import BlockMasks, rollout
from vitca_cli.training.evaluate import batches

VALIDATION_FRACTION = 0.1
MIN_VALIDATION = 100
L2_GRID = (1e-4, 1e-3, 1e-2)  # weight penalties tried; the best on validation is kept


def ca_features(
    model,
    dataset,
    limit: int | None,
    iters: int,
    batch_size: int,
    seed: int,
    progress: Callable[[int], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(hidden features (N, Ch), raw pixels (N, C·H·W), labels (N,))`` for the first ``limit`` images."""
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    masks = BlockMasks(seed, model.cfg.update_rate)  # the update masks `vitca denoise --seed` draws
    feats, pixels, labels = [], [], []
    with torch.inference_mode():
        for images, y in batches(dataset, batch_size, limit, with_labels=True):
            z = rollout(model.step, model.seed(images.float(), gen).to(device), iters, masks)
            feats.append(model.hidden(z).float().mean((2, 3)).cpu())
            pixels.append(images.float().flatten(1))
            labels.append(y)
            if progress is not None:
                progress(len(y))
    return torch.cat(feats), torch.cat(pixels), torch.cat(labels)


def _fit(x: torch.Tensor, y: torch.Tensor, classes: int, l2: float, max_iter: int, seed: int) -> nn.Linear:
    """Multinomial logistic regression with an L2 penalty on the weights, full-batch L-BFGS."""
    torch.manual_seed(seed)  # the layer's initialisation
    clf = nn.Linear(x.shape[1], classes)
    opt = torch.optim.LBFGS(clf.parameters(), lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(clf(x), y) + l2 * clf.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return clf


def train_linear(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    classes: int,
    max_iter: int = 200,
    l2_grid=L2_GRID,
    seed: int = 0,
) -> dict:
    """Fit a linear classifier and return its top-1 accuracies.

    Features are standardised with the training mean and std; the L2 strength is picked from ``l2_grid`` by top-1
    on a held-out ``VALIDATION_FRACTION`` of the training set, and that classifier is the one tested.
    """
    with torch.enable_grad():
        return _train_linear(train_x, train_y, test_x, test_y, classes, max_iter, l2_grid, seed)


def _train_linear(train_x, train_y, test_x, test_y, classes, max_iter, l2_grid, seed) -> dict:
    g = torch.Generator().manual_seed(seed)
    n = len(train_x)
    order = torch.randperm(n, generator=g)
    # A tenth of a small training set is a handful of images whose accuracy moves in large steps (6 images: 0%,
    # 17%, 33%, ...); hold out at least a quarter (up to MIN_VALIDATION images) so the L2 choice means something.
    n_val = max(int(round(VALIDATION_FRACTION * n)), min(n // 4, MIN_VALIDATION)) if n >= 10 else 0
    val_idx, fit_idx = order[:n_val], order[n_val:]
    mean, std = train_x[fit_idx].mean(0), train_x[fit_idx].std(0).clamp_min(1e-6)

    def norm(x):
        return ((x - mean) / std).float()

    fit_x, fit_y = norm(train_x[fit_idx]), train_y[fit_idx]
    val_x, val_y = (norm(train_x[val_idx]), train_y[val_idx]) if n_val else (fit_x, fit_y)

    def accuracy(clf, x, y):
        with torch.no_grad():
            return float((clf(x).argmax(1) == y).float().mean())

    best = None
    for l2 in l2_grid:
        clf = _fit(fit_x, fit_y, classes, l2, max_iter, seed)
        val = accuracy(clf, val_x, val_y)
        if best is None or val > best[0]:
            best = (val, clf, l2)
    val, clf, l2 = best
    return {
        "test_top1": round(accuracy(clf, norm(test_x), test_y), 4),
        "val_top1": round(val, 4),
        "val_images": int(n_val),
        "train_top1": round(accuracy(clf, fit_x, fit_y), 4),
        "l2": l2,
        "features": train_x.shape[1],
    }


def linear_probe(
    model,
    train_set,
    test_set,
    iters: int = 64,
    train_limit: int | None = 2000,
    test_limit: int | None = 1000,
    max_iter: int = 200,
    batch_size: int = 64,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> dict:
    """Probe the frozen CA's averaged hidden channels and, trained the same way, the raw pixels."""
    model.requires_grad_(False).eval()
    tr_f, tr_p, tr_y = ca_features(model, train_set, train_limit, iters, batch_size, seed, progress)
    te_f, te_p, te_y = ca_features(model, test_set, test_limit, iters, batch_size, seed + 1, progress)
    classes = int(max(int(tr_y.max()), int(te_y.max())) + 1)
    settings = dict(classes=classes, max_iter=max_iter, seed=seed)
    return {
        "train_images": len(tr_y),
        "test_images": len(te_y),
        "classes": classes,
        "iters": iters,
        "max_iter": max_iter,
        "seed": seed,
        "ca_hidden_mean": train_linear(tr_f, tr_y, te_f, te_y, **settings),
        "raw_pixels": train_linear(tr_p, tr_y, te_p, te_y, **settings),
    }


def format_probe(report: dict) -> str:
    rows = [("features", "dims", "test top-1", "val top-1", "val images", "train top-1", "L2")]
    for key, label in (("ca_hidden_mean", "CA hidden (spatial mean)"), ("raw_pixels", "raw pixels")):
        r = report[key]
        val_n = r.get("val_images")
        rows.append(
            (
                label,
                str(r["features"]),
                f"{100 * r['test_top1']:.2f}%",
                f"{100 * r['val_top1']:.2f}%",
                str(val_n) if val_n else "0 (the fit set)",
                f"{100 * r['train_top1']:.2f}%",
                f"{r['l2']:g}",
            )
        )
    lines = [
        f"{report.get('dataset', '?')}: linear probe on {report['train_images']} train / "
        f"{report['test_images']} test images, {report['classes']} classes, CA run {report['iters']} steps on "
        f"unmasked images; logistic regression (L-BFGS ≤{report['max_iter']} iterations, L2 picked on "
        f"validation), seed {report['seed']}"
    ]
    lines.append(tables.format_table(rows[0], rows[1:]))
    return "\n".join(lines)
