"""Reusable Beam transforms and the I/O they stand on."""

NAMESPACE = "dicom_etl"  # of every Metrics counter and of the progress logger
