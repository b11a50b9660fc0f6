"""What every benchmark prints: one JSON line per metric on stdout, progress on stderr."""

from __future__ import annotations

import json
import sys


def emit(
    bench: str, metric: str, ours: float, baseline: float | None, target: float | None, met: bool | None
) -> None:
    """One result line; target and met are null for informational metrics."""
    ratio = round(ours / baseline, 4) if baseline else None
    line = {"bench": bench, "metric": metric, "ours": round(ours, 4)}
    line |= {"baseline": None if baseline is None else round(baseline, 4), "ratio": ratio}
    line |= {"target": target, "met": met}
    print(json.dumps(line), flush=True)


def log(message: str) -> None:
    print(f"# {message}", file=sys.stderr, flush=True)
