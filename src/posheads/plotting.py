"""The one way this package gets matplotlib: headless (``Agg``) unless ``MPLBACKEND`` names a backend."""

from __future__ import annotations

import os
from typing import Any

__all__ = ["pyplot"]


def pyplot() -> Any:
    """``matplotlib.pyplot``, imported lazily (plots are optional work) with the ``Agg`` backend, so that
    figures are written to files on machines without a display; an explicit ``MPLBACKEND`` is respected."""
    import matplotlib

    if os.environ.get("MPLBACKEND") is None:
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt
