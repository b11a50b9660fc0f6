"""DICOM logic with neither Beam nor I/O: header reading, UIDs, wildcards, filter lines, conversion,
flattening into table rows, and the failures an item can end with."""

NAMESPACE = "dicom_etl"  # of every Metrics counter and of the project's logger
