"""I/O without Beam: files and gs:// objects, the Store interface with one module per kind of store
(file layout, DICOMweb, Healthcare API), and the metadata tables (Parquet, BigQuery)."""
