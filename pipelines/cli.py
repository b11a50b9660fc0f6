"""`dicom-etl <pipeline> [options]`: the same pipelines as `python -m pipelines.<pipeline>`."""

from __future__ import annotations

import importlib
import sys

PIPELINES = ("import_dicom", "export_dicom", "export_metadata", "delete_dicom")


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1] not in PIPELINES:
        print(f"usage: dicom-etl {{{','.join(PIPELINES)}}} [--option=value ...]", file=sys.stderr)
        return 2
    module = importlib.import_module(f"pipelines.{sys.argv[1]}")
    return module.main(sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
