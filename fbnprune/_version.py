"""The package version, in a module of its own so that modules which record it (``provenance``) need not import
the package root, which imports them back through ``load_pretrained``."""

__version__ = "0.1.0"
