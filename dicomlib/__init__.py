"""DICOM logic with neither Beam nor I/O: header reading, UIDs, wildcards, filter lines, conversion,
flattening into table rows, and the failures an item can end with."""

import warnings

NAMESPACE = "dicom_etl"  # of every Metrics counter and of the project's logger

# pydicom warns of odd values it still reads. Here such values are the data's business: a table row
# drops them with a reason, an import or conversion fails with one. The filter is installed once,
# process-wide: a warnings.catch_warnings() per element would be slow and, changing global state,
# unsafe in a multi-threaded worker.
warnings.filterwarnings("ignore", module=r"pydicom(\.|$)")
