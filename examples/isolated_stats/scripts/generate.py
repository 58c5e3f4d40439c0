"""Write COUNT pseudo-random measurements (seeded, reproducible) as CSV."""

from __future__ import annotations

import random
import sys
from pathlib import Path


def main(count: int, seed: int, out: Path) -> None:
    rng = random.Random(seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = [f"{i},{rng.gauss(100.0, 15.0):.4f}" for i in range(count)]
    out.write_text("id,value\n" + "\n".join(rows) + "\n")
    print(f"wrote {count} rows to {out}")


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]))
