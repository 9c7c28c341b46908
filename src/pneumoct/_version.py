"""The package version (a module of its own, so that importing it never imports the package API)."""
__version__ = "0.1.0"
