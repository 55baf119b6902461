"""Logging for Snakemake scripts: to the rule's log file, optionally echoed to stderr."""

from __future__ import annotations

import logging
import sys
import warnings


def setup(log_file: str, echo: bool = False) -> logging.Logger:
    """Send lorapipe's log (and Python warnings) to ``log_file``; ``echo`` also prints to stderr."""
    handlers: list[logging.Handler] = [logging.FileHandler(log_file, mode="w", encoding="utf-8")]
    if echo:
        handlers.append(logging.StreamHandler(sys.stderr))
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        handlers=handlers,
        force=True,
    )
    logging.captureWarnings(True)
    warnings.filterwarnings("ignore", message=".*torchvision.*")
    return logging.getLogger("lorapipe")
