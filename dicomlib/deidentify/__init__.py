"""De-identification of DICOM data sets, as the Cloud Healthcare API's dicomStores.deidentify does:
profiles from PS3.15 Table E.1-1 (kept as data in table_e1_1.csv), keyed UID and date mappings, a local
sensitive-text detector, and the FHIR Provenance of what was done. Pure: no Beam, no I/O."""

from dicomlib.deidentify.config import ConfigError, DeidConfig, parse_config
from dicomlib.deidentify.profile import Result, deidentify

__all__ = ["ConfigError", "DeidConfig", "Result", "deidentify", "parse_config"]
