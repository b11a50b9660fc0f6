"""A metadata destination, as --metadata_destination names it: a BigQuery table (bq://) or a
directory (local or gs://) of Parquet files."""

from __future__ import annotations

import re
from typing import NamedTuple

from dicomlib.failures import RunFailed

BIGQUERY_TABLE = re.compile(
    r"bq://((?:[a-z0-9.-]+:)?[a-z][a-z0-9-]*[a-z0-9])\.([A-Za-z0-9_]+)\.([A-Za-z0-9_$-]+)"
)
WRITE_DISPOSITIONS = ("WRITE_EMPTY", "WRITE_TRUNCATE", "WRITE_APPEND")
MAX_DESTINATIONS = 5
UID_COLUMNS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
UIDS = ", ".join(UID_COLUMNS)


class DestinationRefused(RunFailed):
    """The destination cannot take this run's rows (not empty under WRITE_EMPTY, a column retyped)."""


class Destination(NamedTuple):
    location: str  # bq://project.dataset.table, a local directory or gs:// prefix

    @property
    def is_bigquery(self) -> bool:
        return self.location.startswith("bq://")

    @property
    def table(self) -> str:
        """project.dataset.table, for a BigQuery destination."""
        return self.location[len("bq://") :]

    @property
    def parts(self) -> tuple[str, str, str]:
        """(project, dataset, table) of a BigQuery destination; the project may be domain:name."""
        match = BIGQUERY_TABLE.fullmatch(self.location)
        if match is None:  # checked with the options already
            raise ValueError(f"{self.location!r} is not bq://project.dataset.table")
        project, dataset, table = match.groups()
        return project, dataset, table
