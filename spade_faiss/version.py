"""The library version (its own module, so that the store can record it without importing the package)."""

__version__ = "0.3.2"
