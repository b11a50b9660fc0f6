"""Lets Dataflow workers install this project with `--setup_file ./setup.py`.

All metadata lives in pyproject.toml; this file only hands it to setuptools.
"""

from setuptools import setup

setup()
