"""effai's version (import-light: the bench and bundle code read it without torch)."""

__version__ = "0.1.0"
