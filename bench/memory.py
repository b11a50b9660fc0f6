"""Benchmark: peak memory of each pipeline on one large file and on a deflate bomb.

    python bench/memory.py [--frames 1000]

Makes two files from CT_small.dcm's header:
  large  native 16-bit 512x512 frames (1,000 of them: 524 MB), one instance
  bomb   Deflated Explicit VR Little Endian, 1 GiB of zero pixels in about 1 MB of file
and runs each pipeline on them as a user would (`python -m pipelines.X` in a fresh process), into a
local file-layout store and out of it, and into and out of a private Orthanc (DICOMweb). The
baseline does the same job the way a hand-written pydicom script does: read the file with
`pydicom.dcmread` (headers with stop_before_pixels), convert from `ds.pixel_array`, POST the file's
bytes with requests. Memory is the peak, sampled every 20 ms, of the resident set of the process
and all its children together (our conversions run in a child process). Ends with one JSON line per
metric; the target is the issue's bound on ours, in MiB: 200 + 1.2 x the file's size, and 500 for
the bomb.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import pydicom
from pydicom.data import get_testdata_file
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import generate_uid

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.orthanc_server import Orthanc, running_orthanc  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MIB = 2**20
BOMB_TARGET = 500
RLE = "1.2.840.10008.1.2.5"


def header(rows: int, frames: int) -> pydicom.Dataset:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"), stop_before_pixels=True)
    ds.Rows = ds.Columns = rows
    ds.NumberOfFrames = frames
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    return ds


def make_large(path: Path, frames: int) -> None:
    ds = header(512, frames)
    frame = (np.arange(512 * 512, dtype=np.uint64) * 2654435761 % 4096).astype("<u2").tobytes()
    ds.PixelData = frame * frames
    ds["PixelData"].VR = "OW"
    ds.save_as(path, enforce_file_format=True)


def make_bomb(path: Path) -> None:
    """1 GiB of zero pixels, deflated as the syntax says, written a chunk at a time."""
    ds = header(512, 2048)
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1.99"
    meta, body = DicomBytesIO(), DicomBytesIO()
    for buffer in (meta, body):
        buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_file_meta_info(meta, ds.file_meta, enforce_standard=False)
    write_dataset(body, ds)
    size = 512 * 512 * 2 * 2048
    compressor = zlib.compressobj(9, wbits=-zlib.MAX_WBITS)
    with open(path, "wb") as out:
        out.write(b"\0" * 128 + b"DICM" + meta.getvalue())
        out.write(
            compressor.compress(body.getvalue() + struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OW", 0, size))
        )
        chunk = bytes(1 << 24)
        for _ in range(size >> 24):
            out.write(compressor.compress(chunk))
        out.write(compressor.flush())


def tree_rss(pid: int) -> int:
    """Resident bytes of a process and its descendants."""
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        try:
            with open(f"/proc/{current}/status") as status:
                total += next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))
            with open(f"/proc/{current}/task/{current}/children") as children:
                todo += [int(child) for child in children.read().split()]
        except (OSError, StopIteration):
            pass
    return total


def peak_mib(command: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, int, str]:
    """(peak resident MiB of the command's process tree, its exit status, its last stdout line)."""
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    peak = 0
    while process.poll() is None:
        peak = max(peak, tree_rss(process.pid))
        time.sleep(0.02)
    out, err = process.communicate()
    lines = out.decode().strip().splitlines()
    if process.returncode not in (0, 3):
        print(
            f"  {' '.join(command[-4:])}: exit {process.returncode}: {err.decode()[-400:]}", file=sys.stderr
        )
    return peak / MIB, process.returncode, lines[-1] if lines else ""


BASELINES = {
    "header": "import sys, pydicom; pydicom.dcmread(sys.argv[1], stop_before_pixels=True).to_json_dict()",
    "copy": "import shutil, sys, pydicom; pydicom.dcmread(sys.argv[1], stop_before_pixels=True); "
    "shutil.copy(sys.argv[1], sys.argv[2])",
    "frames": "import sys, pydicom; ds = pydicom.dcmread(sys.argv[1]); "
    "[open(f'{sys.argv[2]}_{i}.bin', 'wb').write(f.tobytes()) for i, f in enumerate(ds.pixel_array)]",
    "png": "import sys, pydicom; from PIL import Image; ds = pydicom.dcmread(sys.argv[1]); "
    "[Image.fromarray((f >> 4).astype('uint8')).save(f'{sys.argv[2]}_{i}.png') "
    "for i, f in enumerate(ds.pixel_array)]",
    "transcode": f"import sys, pydicom; ds = pydicom.dcmread(sys.argv[1]); ds.compress('{RLE}'); "
    "ds.save_as(sys.argv[2])",
    "stow": "import os, sys, uuid, requests; data = open(sys.argv[1], 'rb').read(); b = uuid.uuid4().hex; "
    "body = b''.join([f'--{b}\\r\\nContent-Type: application/dicom\\r\\n\\r\\n'.encode(), data, "
    "f'\\r\\n--{b}--\\r\\n'.encode()]); requests.post(sys.argv[2] + '/studies', data=body, "
    "auth=(os.environ['DICOMWEB_USERNAME'], os.environ['DICOMWEB_PASSWORD']), headers={'Content-Type': "
    "f'multipart/related; type=\"application/dicom\"; boundary={b}'}).raise_for_status()",
}


def measure(name: str, file: Path, work: Path, orthanc: Orthanc, target: float) -> None:
    """Every pipeline on `file`, each beside its baseline; one JSON line each."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DICOMWEB_USERNAME": orthanc.username}
    env["DICOMWEB_PASSWORD"] = orthanc.password
    store, web, out = f"--store={work}/{name}-store", f"--store={orthanc.dicomweb}", f"--output={work}/{name}"
    source, copy, root, meta = str(file), str(work / f"{name}-copy"), orthanc.dicomweb, f"{work}/{name}-meta"
    cases = [  # metric, pipeline and options, baseline, the baseline's arguments
        ("import_dicom", ["import_dicom", f"--input={file}", store], "copy", [source, copy]),
        ("import_dicom_dicomweb", ["import_dicom", f"--input={file}", web], "stow", [source, root]),
        ("export_metadata", ["export_metadata", store, f"--destination={meta}"], "header", [source]),
        ("export_dicom_octet_stream", ["export_dicom", store, f"{out}-bin", "--file_type=octet-stream"],
         "frames", [source, copy]),
        ("export_dicom_png", ["export_dicom", store, f"{out}-png", "--file_type=png"], "png", [source, copy]),
        ("export_dicom_rle", ["export_dicom", store, f"{out}-rle", f"--transfer_syntax={RLE}"],
         "transcode", [source, f"{copy}.dcm"]),
        ("export_dicom_from_dicomweb", ["export_dicom", web, f"{out}-web", "--file_type=octet-stream"],
         "frames", [source, copy]),
    ]  # fmt: skip
    for metric, (pipeline, *options), baseline, arguments in cases:
        ours = [sys.executable, "-m", f"pipelines.{pipeline}", *options, f"--dead_letter={work}/dl"]
        our_peak, status, summary = peak_mib(ours, work, env)
        base_peak, _, _ = peak_mib([sys.executable, "-c", BASELINES[baseline], *arguments], work, env)
        line = {"bench": "memory", "metric": f"{metric}_{name}_peak_rss_mib", "ours": round(our_peak),
                "baseline": round(base_peak), "ratio": round(our_peak / base_peak, 3) if base_peak else None,
                "target": round(target), "met": our_peak <= target, "exit": status}  # fmt: skip
        print(f"  {metric} on {name}: {summary[:160]}", file=sys.stderr)
        print(json.dumps(line), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, default=1000, help="frames of 512 KiB in the large file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory, running_orthanc() as orthanc:
        work = Path(directory)
        (work / "files").mkdir()
        large, bomb = work / "files" / "large.dcm", work / "files" / "bomb.dcm"
        make_large(large, args.frames)
        make_bomb(bomb)
        size = large.stat().st_size / MIB
        print(f"large: {size:.0f} MiB; bomb: {bomb.stat().st_size / MIB:.1f} MiB", file=sys.stderr)
        measure("large", large, work, orthanc, 200 + 1.2 * size)
        orthanc.clear()
        measure("bomb", bomb, work, orthanc, BOMB_TARGET)


if __name__ == "__main__":
    main()
