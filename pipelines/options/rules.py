"""The checks that span groups, or a group and Beam's own options: all of them, in one place.

A rule applies to a pipeline that takes every option it names. Rules run after every group's check,
so they see normal forms (an absolute path, a store's kind).
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass

from apache_beam.options.pipeline_options import GoogleCloudOptions

from pipelines.options.base import EtlOptions, OptionError, is_local, spool_root
from storage.stores import store_kind


@dataclass(frozen=True)
class Rule:
    options: tuple[str, ...]
    check: Callable[[EtlOptions], None]


def _dicomweb_only(options: EtlOptions) -> None:
    """A file-layout store has no storage class, no acknowledgements to verify, no request quota."""
    if store_kind(options.store) != "files":
        return
    given = {
        "storage_class": options.storage_class is not None,
        "verify_stored": options.verify_stored,
        "max_requests_in_flight": options.max_requests_in_flight is not None,
    }
    for name, value in given.items():
        if value:
            raise OptionError(name, "applies to DICOMweb and Cloud Healthcare API stores only")


def _bigquery_loads_need_gcs(option: str) -> Callable[[EtlOptions], None]:
    """BigQuery file loads stage their files in GCS: a bq:// destination needs a gs:// --temp_location."""

    def check(options: EtlOptions) -> None:
        temp = options.view_as(GoogleCloudOptions).temp_location or ""
        if any(text.startswith("bq://") for text in getattr(options, option)) and not temp.startswith(
            "gs://"
        ):
            raise OptionError(option, "a bq:// destination needs --temp_location=gs://... for its load files")

    return check


def _spool_needs_gcs(option: str) -> Callable[[EtlOptions], None]:
    """On a distributed runner, metadata rows wait for the table's schema in spool files under
    --temp_location (spool_root): its workers share no disk."""

    def check(options: EtlOptions) -> None:
        if getattr(options, option) and not is_local(options) and not spool_root(options).startswith("gs://"):
            raise OptionError(
                "temp_location", "must be gs://... on a distributed runner: metadata rows are spooled there"
            )

    return check


RULES = (
    Rule(("store", "storage_class", "verify_stored", "max_requests_in_flight"), _dicomweb_only),
    Rule(("metadata_destination",), _bigquery_loads_need_gcs("metadata_destination")),
    Rule(("destination",), _bigquery_loads_need_gcs("destination")),
    Rule(("metadata_destination",), _spool_needs_gcs("metadata_destination")),
    Rule(("destination", "max_columns"), _spool_needs_gcs("destination")),  # export_metadata's tables
)


def check_rules(options: EtlOptions, names: Collection[str]) -> None:
    """The rules of a pipeline that takes the options `names`."""
    for rule in RULES:
        if set(rule.options) <= set(names):
            rule.check(options)
