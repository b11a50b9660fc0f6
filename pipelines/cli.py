"""`dicom-etl <pipeline> [options]`: the same pipelines as `python -m pipelines.<pipeline>`."""

from __future__ import annotations

import ast
import difflib
import importlib
import importlib.util
import sys
from pathlib import Path

PIPELINES = (
    "import_dicom",
    "export_dicom",
    "export_metadata",
    "delete_dicom",
    "deidentify_dicom",
    "import_images",
)
USAGE = "usage: dicom-etl PIPELINE --option=value ...   (dicom-etl PIPELINE --help lists its options)"


def main() -> int:
    name = sys.argv[1] if len(sys.argv) > 1 else None
    if name in ("-h", "--help"):
        print(overview())
        return 0
    if name not in PIPELINES:
        guess = difflib.get_close_matches(name or "", PIPELINES, n=1)
        hint = f", did you mean {guess[0]}?" if guess else ""
        what = f"unknown pipeline {name!r}{hint}" if name else "name a pipeline"
        print(f"error: {what} (one of {', '.join(PIPELINES)}; see dicom-etl --help)", file=sys.stderr)
        return 2
    return importlib.import_module(f"pipelines.{name}").main(sys.argv[2:])


def overview() -> str:
    """The pipelines, one line each: the first line of each module's docstring, read without
    importing the module (and Beam), so that --help answers at once."""
    lines = [USAGE, "", "pipelines:"]
    for name in PIPELINES:
        spec = importlib.util.find_spec(f"pipelines.{name}")
        assert spec and spec.origin
        doc = ast.get_docstring(ast.parse(Path(spec.origin).read_text())) or ""
        lines.append(f"  {name:<16} {doc.splitlines()[0] if doc else ''}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
