"""The package version (one home: the package, its files and its command line read it here)."""

__version__ = "0.1.0"
