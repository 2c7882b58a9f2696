"""Is model B better than model A beyond the noise? The paired difference of two ``vitca eval --json`` reports.

Two evaluations with the same dataset, protocol, seed and batch size see the same images, mask combos and masks
(one with ``--limit`` sees the first of them), so their batch PSNRs can be compared batch by batch: the 95% interval
of the mean difference is far narrower than either report's own interval (which is mostly the spread between mask
combos). The masks do not depend on the CA's steps or update rate, so two runs of one model that differ only in
those are paired too (what differs is printed).

    vitca eval -w A ... --json > a.json
    vitca eval -w B ... --json > b.json      # the same settings
    python bench/compare_eval.py a.json b.json

Reports of ``bench/photo_quality.py --json`` made alike (same photos, size, kinds and seed: the same damage) are
compared photo by photo, per damage kind and over all of them, whatever else differs (weights, steps, precision).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vitca_cli.training.metrics import mean_interval  # noqa: E402

SAME = ("dataset", "split", "protocol", "mask_type", "seed", "combos", "batch_size")  # the same damage
RUN = ("weights", "iters", "update_rate", "runs", "step", "device")  # how it was restored


def main() -> None:
    if len(sys.argv) != 3 or sys.argv[1].startswith("-"):
        sys.exit(__doc__)
    a, b = (json.loads(Path(p).read_text()) for p in sys.argv[1:])
    if "kinds" in a and "kinds" in b:
        return compare_photos(a, b)
    differing = [k for k in SAME if a.get(k) != b.get(k)]
    if differing:
        sys.exit(f"the reports were not made alike (they differ in: {', '.join(differing)}): no paired comparison")
    how = [k for k in RUN if k in a and k in b and a[k] != b[k]]
    if how:
        print("A and B differ in: " + ", ".join(f"{k} {a[k]} → {b[k]}" for k in how))
    xa, xb = a.get("vitca_batch_psnr"), b.get("vitca_batch_psnr")
    if not xa or not xb:
        sys.exit("a report lacks the per-batch PSNRs (made by an older vitca eval?)")
    xa, xb = common_batches(a, b, xa, xb)
    diff, half = mean_interval([q - p for p, q in zip(xa, xb)])
    better = sum(q > p for p, q in zip(xa, xb))
    print(
        f"batch PSNR: A {sum(xa) / len(xa):.3f} dB, B {sum(xb) / len(xb):.3f} dB; "
        f"B − A = {diff:+.3f} ± {half:.3f} dB (95%, paired over {len(xa)} batches; B ahead in {better})"
    )
    print(verdict(diff, half))


def common_batches(a: dict, b: dict, xa: list, xb: list) -> tuple[list, list]:
    """The batches both reports scored. Batches are drawn and damaged in order, so an evaluation with ``--limit N``
    sees exactly the first N images' damage of a longer one: the two pair over the shorter's batches, provided
    those are all whole (N a multiple of the batch size)."""
    if a.get("images") == b.get("images") and len(xa) == len(xb):
        return xa, xb
    short = min((a, b), key=lambda r: r.get("images", 0))
    size = short.get("batch_size")
    whole = isinstance(size, int) and size > 0 and short.get("images", 0) == size * len(short["vitca_batch_psnr"])
    if not whole:
        sys.exit(
            f"the reports scored {a.get('images')} and {b.get('images')} images and the shorter's batches are not "
            "all whole (or its batch size is unknown): no paired comparison"
        )
    n = min(len(xa), len(xb))
    print(f"paired over the first {n} batches ({short['images']} images) that both reports scored")
    return xa[:n], xb[:n]


def verdict(diff: float, half: float) -> str:
    return (
        "B is better beyond the noise"
        if diff - half > 0
        else "A is better beyond the noise"
        if diff + half < 0
        else "no difference shown"
    )


def compare_photos(a: dict, b: dict) -> None:
    """Paired per-photo PSNR differences of vitca in two ``bench/photo_quality.py`` reports."""
    same = {"seed": 0}  # reports made before the seed was recorded used the default
    differing = [k for k in ("photos", "size", "seed") if a.get(k, same.get(k)) != b.get(k, same.get(k))] + (
        ["kinds"] if list(a["kinds"]) != list(b["kinds"]) else []
    )
    if differing:
        sys.exit(f"the reports were not made alike (they differ in: {', '.join(differing)}): no paired comparison")
    how = [k for k in sorted(set(a) & set(b)) if k not in ("kinds", "photos") and a[k] != b[k]]
    if how:  # the same damaged photos restored two ways (other weights, steps, precision...): still paired
        print("A and B differ in: " + ", ".join(f"{k} {a.get(k)} → {b.get(k)}" for k in how))
    pooled = []
    for kind in a["kinds"]:
        xa, xb = (r["kinds"][kind]["vitca"].get("psnr_per_photo") for r in (a, b))
        if not xa or not xb:
            sys.exit("a report lacks the per-photo PSNRs (made by an older bench/photo_quality.py?)")
        d = [q - p for p, q in zip(xa, xb)]
        pooled += d
        diff, half = mean_interval(d)
        print(f"{kind:<16} A {sum(xa) / len(xa):6.2f}  B {sum(xb) / len(xb):6.2f}  B − A = {diff:+.3f} ± {half:.3f} dB")
    diff, half = mean_interval(pooled)
    print(f"all kinds: B − A = {diff:+.3f} ± {half:.3f} dB (95%, paired over {len(pooled)} photo × damage pairs)")
    print(verdict(diff, half))


if __name__ == "__main__":
    main()
