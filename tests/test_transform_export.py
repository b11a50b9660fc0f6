"""ExportInstances alone in a TestPipeline: the files it writes for each instance, the dead letter of
each stage (select, read, convert, write) and the counters, from a local store and from Orthanc."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import apache_beam as beam
import pytest

from dicomlib.uids import InstanceRef
from tests.beam_support import (
    CT,
    MR,
    SAMPLE,
    closed_port_url,
    counters,
    expect_outputs,
    filled_store,
    letters,
    new_pipeline,
    orthanc_store,
    quick_retries,
    ref_of,
    run,
)
from tests.fault_proxy import Fault, FaultProxy
from tests.orthanc_server import Orthanc
from transforms.dead_letter import DEAD_LETTER
from transforms.export import ExportInstances

RTDOSE = SAMPLE / "rt" / "rtdose.dcm"  # 15 frames
SR = SAMPLE / "other" / "test-SR.dcm"  # no Pixel Data
SERIES = sorted(SAMPLE.glob("ct/77654033/*.dcm"))  # one CT series of four


def export(
    store: str, refs: list[InstanceRef], output: Path, file_type: str = "dicom", syntax: str = "*"
) -> tuple[beam.Pipeline, Any]:
    pipeline = new_pipeline()
    outputs = (
        pipeline
        | beam.Create(refs)
        | beam.ParDo(ExportInstances(store, str(output), file_type, syntax)).with_outputs(
            DEAD_LETTER, main="written"
        )
    )
    return pipeline, outputs


def stem(output: Path, ref: InstanceRef) -> str:
    """The contract's layout: {output}/{study}/{series}/{sop}."""
    return f"{output}/{ref.study}/{ref.series}/{ref.sop}"


def test_export_instances_copies_each_instance_unchanged_under_its_study_and_series(tmp_path: Path) -> None:
    store = filled_store(tmp_path / "store", SERIES)
    output = tmp_path / "out"
    refs = [ref_of(path) for path in SERIES]
    pipeline, outputs = export(store.location, refs, output)

    expect_outputs(outputs.written, letters(outputs), [f"{stem(output, ref)}.dcm" for ref in refs], [])
    result = run(pipeline)

    size = sum(path.stat().st_size for path in SERIES)
    assert counters(result) == {"success": 4, "files_written": 4, "bytes_through_worker": size}
    for path, ref in zip(SERIES, refs, strict=True):
        assert Path(f"{stem(output, ref)}.dcm").read_bytes() == path.read_bytes()
    assert sorted(p.name for p in output.iterdir()) == [refs[0].study]  # no staging left behind


def test_export_instances_renders_one_image_per_frame_and_dead_letters_an_instance_without_pixels(
    tmp_path: Path,
) -> None:
    store = filled_store(tmp_path / "store", [RTDOSE, CT, SR])
    output = tmp_path / "out"
    dose, ct, sr = ref_of(RTDOSE), ref_of(CT), ref_of(SR)
    pipeline, outputs = export(store.location, [dose, ct, sr], output, "png")

    frames = [f"{stem(output, dose)}_{number:04d}.png" for number in range(1, 16)]
    expected = [*frames, f"{stem(output, ct)}.png"]
    expect_outputs(outputs.written, letters(outputs), expected, [(sr.path(), "convert", "no_pixel_data")])
    result = run(pipeline)

    assert counters(result)["success"] == 2 and counters(result)["failure"] == 1
    assert counters(result)["files_written"] == 16
    written = sorted(Path(name) for name in [*frames, f"{stem(output, ct)}.png"])
    assert sorted(output.rglob("*.png")) == written  # and nothing for the instance without pixels


def test_export_instances_dead_letters_a_bad_uid_a_missing_instance_and_an_unwritable_output(
    tmp_path: Path,
) -> None:
    """Each failure is one dead letter of its stage: a UID that cannot be a path (select), an
    instance the store does not hold (read), an output that cannot be written (write)."""
    store = filled_store(tmp_path / "store", [CT, MR])
    output = tmp_path / "out"
    output.mkdir()
    mr = ref_of(MR)
    (output / mr.study).write_text("a file where the study's directory would go")
    hostile = InstanceRef(ref_of(CT).study, ref_of(CT).series, "../../etc")
    missing = InstanceRef(ref_of(CT).study, ref_of(CT).series, "1.2.826.0.1.3680043.2.1125.99")
    pipeline, outputs = export(store.location, [hostile, missing, mr, ref_of(CT)], output)

    expected = [
        (hostile.path(), "select", "invalid_uid"),
        (missing.path(), "read", "not_found"),
        (mr.path(), "write", "write_error"),
    ]
    expect_outputs(outputs.written, letters(outputs), [f"{stem(output, ref_of(CT))}.dcm"], expected)
    result = run(pipeline)

    assert counters(result)["success"] == 1 and counters(result)["failure"] == 3
    assert not (tmp_path / "etc").exists()


def test_export_instances_reads_a_dicomweb_store_through_its_retries_and_dead_letters_what_it_lacks(
    orthanc: Orthanc, tmp_path: Path
) -> None:
    """From a DICOMweb store: a WADO-RS answered 503 is asked again and exported; 404 is
    `not_found`."""
    for path in SERIES[:2]:
        orthanc_store(orthanc, path)
    flaky, fine, missing = ref_of(SERIES[0]), ref_of(SERIES[1]), ref_of(CT)
    faults = [Fault.status(503)] * 2
    output = tmp_path / "out"
    with FaultProxy(orthanc.rest, faults, when=lambda method, path: flaky.sop in path) as proxy:
        pipeline, outputs = export(f"{proxy.url}/dicom-web", [flaky, fine, missing], output)
        expected = [f"{stem(output, flaky)}.dcm", f"{stem(output, fine)}.dcm"]
        expect_outputs(outputs.written, letters(outputs), expected, [(missing.path(), "read", "not_found")])
        result = run(pipeline)

    assert [request.fault for request in proxy.requests if request.fault] == faults
    assert counters(result)["success"] == 2 and counters(result)["failure"] == 1
    for path, ref in ((SERIES[0], flaky), (SERIES[1], fine)):
        assert Path(f"{stem(output, ref)}.dcm").read_bytes() == path.read_bytes()


def test_export_instances_stops_the_run_when_the_store_cannot_be_reached(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    quick_retries(monkeypatch)
    location = closed_port_url()
    pipeline, _ = export(location, [ref_of(CT)], tmp_path / "out")

    with pytest.raises(Exception, match=f"cannot reach the DICOMweb store {location}: .*Connection refused"):
        run(pipeline)


def test_export_instances_calls_a_dicomweb_store_that_keeps_failing_a_read_error_of_the_read_stage(
    orthanc: Orthanc, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """WADO-RS answered 503 after every retry: the store could not be read, the output is fine."""
    quick_retries(monkeypatch)
    series = sorted(SAMPLE.glob("ct/77654033/*.dcm"))
    orthanc_store(orthanc, series[0])
    failing = ref_of(series[0])
    with FaultProxy(
        orthanc.rest, [Fault.status(503)] * 50, when=lambda method, path: failing.sop in path
    ) as proxy:
        pipeline = new_pipeline()
        outputs = (
            pipeline
            | beam.Create([failing])
            | beam.ParDo(
                ExportInstances(f"{proxy.url}/dicom-web", str(tmp_path / "out"), "dicom", "*")
            ).with_outputs(DEAD_LETTER, main="written")
        )
        dead = outputs[DEAD_LETTER] | beam.Map(lambda r: (r["uri"], r["stage"], r["reason"]))
        expect_outputs(outputs.written, dead, [], [(failing.path(), "read", "read_error")])
        run(pipeline)
