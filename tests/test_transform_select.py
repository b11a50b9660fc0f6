"""ListStudies, ListInstances, SelectTargets and DeleteTargets alone in a TestPipeline: what each
selects or deletes, the targets that match nothing, listings and deletions that fail, and stores
that cannot be used at all."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import apache_beam as beam
import pytest
from apache_beam.testing.util import assert_that, equal_to

from dicomlib.filters import Target
from storage import dicomweb
from tests.beam_support import (
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
from tests.conftest import stored_instances
from tests.fault_proxy import Fault, FaultProxy
from tests.healthcare_server import STORE, HealthcareApi
from tests.orthanc_server import Orthanc
from transforms.dead_letter import DEAD_LETTER
from transforms.select import DeleteTargets, ListInstances, ListStudies, SelectTargets

FILES = sorted(SAMPLE.rglob("*.dcm"))
REFS = {ref_of(path) for path in FILES}
CT_SERIES = sorted(SAMPLE.glob("ct/77654033/*.dcm"))  # one series of four
MR_SERIES = sorted(SAMPLE.glob("mr/98892003/6*.dcm"))  # one series of three
ABSENT = "1.2.826.0.1.3680043.2.1125.404"  # a UID no store here holds


def apply(dofn: beam.DoFn, targets: list[Target]) -> tuple[beam.Pipeline, Any]:
    pipeline = new_pipeline()
    outputs = pipeline | beam.Create(targets) | beam.ParDo(dofn).with_outputs(DEAD_LETTER, main="refs")
    return pipeline, outputs


def test_list_studies_yields_a_target_for_every_study_in_the_store(tmp_path: Path) -> None:
    store = filled_store(tmp_path / "store", FILES)
    studies = {ref.study for ref in REFS}
    pipeline = new_pipeline()
    targets = pipeline | beam.Create([None]) | beam.ParDo(ListStudies(store.location))

    assert_that(targets, equal_to([Target(study) for study in studies]))
    result = run(pipeline)

    assert counters(result) == {"objects_listed": len(studies)}


def test_list_instances_lists_studies_and_series_takes_instances_as_they_are_and_dead_letters_no_match(
    tmp_path: Path,
) -> None:
    """An instance target is selected without listing (an export finds it missing later); a study
    or series with nothing in the store is a `no_match` dead letter."""
    store = filled_store(tmp_path / "store", FILES)
    ct, mr, one = ref_of(CT_SERIES[0]), ref_of(MR_SERIES[0]), ref_of(MR)
    targets = [
        Target(ct.study),
        Target(mr.study, mr.series),
        Target(one.study, one.series, one.sop),
        Target(one.study, one.series, ABSENT),
        Target(ABSENT),
        Target(ct.study, ABSENT),
    ]
    pipeline, outputs = apply(ListInstances(store.location), targets)

    selected = [ref_of(path) for path in CT_SERIES + MR_SERIES] + [one, one._replace(sop=ABSENT)]
    expected = [
        (f"/studies/{ABSENT}", "select", "no_match"),
        (f"/studies/{ct.study}/series/{ABSENT}", "select", "no_match"),
    ]
    expect_outputs(outputs.refs, letters(outputs), selected, expected)
    result = run(pipeline)

    assert counters(result)["selected"] == len(selected)
    assert counters(result)["unmatched_targets"] == 2


def test_list_instances_dead_letters_a_listing_that_breaks_off_and_keeps_what_it_listed(
    orthanc: Orthanc, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A QIDO-RS page that stays 503 after the retries: the instances of the pages before it are
    selected, and the target is a `read_error` dead letter saying how far the listing got."""
    quick_retries(monkeypatch)
    monkeypatch.setattr(dicomweb, "PAGE", 2)
    for path in CT_SERIES:
        orthanc_store(orthanc, path)
    study = ref_of(CT_SERIES[0]).study
    series = {ref_of(path) for path in CT_SERIES}
    faults = [Fault.status(503)] * 50
    with FaultProxy(orthanc.rest, faults, when=lambda method, path: "offset=2" in path) as proxy:
        pipeline, outputs = apply(ListInstances(f"{proxy.url}/dicom-web"), [Target(study)])

        how_far = outputs[DEAD_LETTER] | beam.Map(
            lambda r: (r["uri"], r["reason"], r["detail"].split(":")[0])
        )
        expected = (f"/studies/{study}", "read_error", "the listing stopped after 2 instances")
        both = (
            outputs.refs | "Refs" >> beam.Map(lambda ref: ("ref", ref)),
            how_far | "Letter" >> beam.Map(lambda letter: (DEAD_LETTER, letter)),
        ) | beam.Flatten()

        def two_of_the_series_and_the_letter(found: list) -> None:
            refs = [ref for kind, ref in found if kind == "ref"]
            assert len(refs) == 2 and set(refs) <= series, found
            assert [letter for kind, letter in found if kind == DEAD_LETTER] == [expected], found

        assert_that(both, two_of_the_series_and_the_letter)
        result = run(pipeline)

    assert counters(result)["selected"] == 2 and counters(result)["unmatched_targets"] == 1


@pytest.mark.parametrize("dofn", [ListStudies, ListInstances, DeleteTargets])
def test_selecting_from_a_store_that_cannot_be_reached_stops_the_run(
    monkeypatch: pytest.MonkeyPatch, dofn: type[beam.DoFn]
) -> None:
    quick_retries(monkeypatch)
    location = closed_port_url()
    pipeline, _ = apply(dofn(location), [Target(ref_of(MR).study)])

    with pytest.raises(Exception, match=f"cannot reach the DICOMweb store {location}: .*Connection refused"):
        run(pipeline)


def test_select_targets_merges_the_lines_of_a_filter_file_study_by_study(tmp_path: Path) -> None:
    """Lines inside a wider line, and repeated lines, select nothing more."""
    ct, mr = ref_of(CT_SERIES[0]), ref_of(MR_SERIES[0])
    lines = [ct.path(), f"/studies/{ct.study}", f"/studies/{mr.study}/series/{mr.series}", mr.path(), ""]
    filter_file = tmp_path / "filter.txt"
    filter_file.write_text("\n".join([*lines, lines[2]]) + "\n")
    pipeline = new_pipeline()
    from_file = pipeline | "FromFile" >> SelectTargets(str(tmp_path / "unused"), filter_file=str(filter_file))
    from_lines = pipeline | "FromLines" >> SelectTargets(str(tmp_path / "unused"), targets=lines[:4])

    expected = [Target(ct.study), Target(mr.study, mr.series)]
    both = (
        from_file | "File" >> beam.Map(lambda target: ("file", target)),
        from_lines | "Lines" >> beam.Map(lambda target: ("lines", target)),
    ) | beam.Flatten()
    assert_that(both, equal_to([(source, t) for source in ("file", "lines") for t in expected]))
    run(pipeline)


def test_select_targets_without_a_filter_selects_every_study_of_the_store(tmp_path: Path) -> None:
    store = filled_store(tmp_path / "store", FILES)
    pipeline = new_pipeline()
    targets = pipeline | SelectTargets(store.location)

    assert_that(targets, equal_to([Target(study) for study in {ref.study for ref in REFS}]))
    run(pipeline)


def test_delete_targets_deletes_what_each_target_covers_and_dead_letters_no_match(tmp_path: Path) -> None:
    store = filled_store(tmp_path / "store", FILES)
    ct, one = ref_of(CT_SERIES[0]), ref_of(MR)
    targets = [
        Target(ct.study, ct.series),
        Target(one.study, one.series, one.sop),
        Target(one.study, one.series, ABSENT),
        Target(ABSENT),
    ]
    pipeline, outputs = apply(DeleteTargets(store.location), targets)

    deleted = [ref_of(path) for path in CT_SERIES] + [one]
    expected = [
        (f"{one.path().rsplit('/', 1)[0]}/{ABSENT}", "select", "no_match"),
        (f"/studies/{ABSENT}", "select", "no_match"),
    ]
    expect_outputs(outputs.refs, letters(outputs), deleted, expected)
    result = run(pipeline)

    assert counters(result) == {"selected": 5, "success": 5, "unmatched_targets": 2}
    assert set(stored_instances(Path(store.location))) == {ref.sop for ref in REFS - set(deleted)}


def test_delete_targets_dead_letters_each_instance_of_a_deletion_the_store_keeps_failing(
    healthcare: HealthcareApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DELETE answered 503 after every retry: each instance the target covered is a
    `delete_error`, and the store still holds them."""
    quick_retries(monkeypatch)
    for path in CT_SERIES:
        healthcare.add(path.read_bytes())
    ct = ref_of(CT_SERIES[0])
    healthcare.fail_next(100, 503, method="DELETE")
    pipeline, outputs = apply(DeleteTargets(STORE), [Target(ct.study, ct.series)])

    expected = [(ref_of(path).path(), "delete", "delete_error") for path in CT_SERIES]
    expect_outputs(outputs.refs, letters(outputs), [], expected)
    result = run(pipeline)

    assert counters(result) == {"selected": 4, "failure": 4}
    assert len(healthcare.instances) == 4


def test_delete_targets_on_a_store_without_dicomweb_delete_stops_the_run(orthanc: Orthanc) -> None:
    orthanc_store(orthanc, MR)
    one = ref_of(MR)
    pipeline, _ = apply(DeleteTargets(orthanc.dicomweb), [Target(one.study)])

    with pytest.raises(Exception, match=f"the DICOMweb server at {orthanc.dicomweb} does not support DELETE"):
        run(pipeline)
    assert orthanc.sop_instance_uids() == {one.sop}
