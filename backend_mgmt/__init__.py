# The one place the version is written: the package metadata (pyproject.toml) reads it from
# here, and tests/test_version.py checks that debian/changelog's upstream version agrees.
__version__ = "0.1.0"
