"""The program of every flex template (FLEX_TEMPLATE_PYTHON_PY_FILE): one image serves all six.

Dataflow's launcher runs this file with the launched template's parameters as `--name=value` options,
plus the job's own options (`--runner`, `--project`, `--temp_location`, `--template_location`, ...).
The environment variable is fixed in the image, so the pipeline is told apart by the one option that
only it takes and that its template requires: `--input` (import_dicom), `--output` (export_dicom),
`--source` (deidentify_dicom), `--sop_class` (import_images, whose template requires it although the
pipeline has a default; its `--input` then does not count), `--destination` (export_metadata;
deidentify_dicom's template requires it too, so it counts only without `--source`); with none of them
it is delete_dicom, whose template lists none of them. Dataflow refuses a launch that lacks a
required parameter or gives one that the template's metadata.json does not list, so a launch reaches
only the pipeline of its own template.

The pipeline's own `main` then parses, checks, builds and submits, as `python -m pipelines.<name>` does.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

MARKERS = {
    "input": "import_dicom",
    "output": "export_dicom",
    "source": "deidentify_dicom",
    "sop_class": "import_images",
    "destination": "export_metadata",
}
FALLBACK = "delete_dicom"


def pipeline_for(argv: Sequence[str]) -> str:
    """The pipeline these options are for; ValueError if they name options of two pipelines."""
    given = {arg[2:].split("=", 1)[0] for arg in argv if arg.startswith("--")}
    if "source" in given:
        given.discard("destination")  # deidentify_dicom's destination store
    if "sop_class" in given:
        given.discard("input")  # import_images's images
    found = sorted({MARKERS[name] for name in given & MARKERS.keys()})
    if len(found) > 1:
        raise ValueError(f"options of {' and '.join(found)} given together")
    return found[0] if found else FALLBACK


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        name = pipeline_for(argv)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return importlib.import_module(f"pipelines.{name}").main(argv)


if __name__ == "__main__":
    sys.exit(main())
