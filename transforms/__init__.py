"""Beam transforms: thin DoFns and PTransforms over the storage and dicomlib libraries."""
