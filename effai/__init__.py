"""effai: train, fold, quantize and export compact vision models to phones and edge boards.

The pipeline flows one way: zoo -> fold -> quantize -> lower -> artifact + manifest -> bench -> report.
"""

from effai.version import __version__

__all__ = ["__version__"]
