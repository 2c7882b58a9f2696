"""Is model B better than model A beyond the noise? The paired difference of two ``vitca eval --json`` reports.

Two evaluations with the same dataset, protocol, seed and limit see the same images, mask combos and masks, so
their batch PSNRs can be compared batch by batch: the 95% interval of the mean difference is far narrower than
either report's own interval (which is mostly the spread between mask combos).

    vitca eval -w A ... --json > a.json
    vitca eval -w B ... --json > b.json      # the same settings
    python bench/compare_eval.py a.json b.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.metrics import mean_interval  # noqa: E402

SAME = ("images", "protocol", "iters", "mask_type", "seed", "update_rate", "combos")


def main() -> None:
    if len(sys.argv) != 3 or sys.argv[1].startswith("-"):
        sys.exit(__doc__)
    a, b = (json.loads(Path(p).read_text()) for p in sys.argv[1:])
    differing = [k for k in SAME if a.get(k) != b.get(k)]
    if differing:
        sys.exit(f"the reports were not made alike (they differ in: {', '.join(differing)}): no paired comparison")
    xa, xb = a.get("vitca_batch_psnr"), b.get("vitca_batch_psnr")
    if not xa or not xb or len(xa) != len(xb):
        sys.exit("a report lacks the per-batch PSNRs (made by an older vitca eval?)")
    diff, half = mean_interval([q - p for p, q in zip(xa, xb)])
    better = sum(q > p for p, q in zip(xa, xb))
    print(
        f"batch PSNR: A {sum(xa) / len(xa):.3f} dB, B {sum(xb) / len(xb):.3f} dB; "
        f"B − A = {diff:+.3f} ± {half:.3f} dB (95%, paired over {len(xa)} batches; B ahead in {better})"
    )
    verdict = "B is better" if diff - half > 0 else "A is better" if diff + half < 0 else "no difference shown"
    print(verdict + " beyond the noise" if "better" in verdict else verdict)


if __name__ == "__main__":
    main()
