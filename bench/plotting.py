"""Where the benchmarks' PNGs go, and matplotlib without a display."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

PLOTS = Path(__file__).resolve().parent / "plots"


def pyplot() -> ModuleType:
    import matplotlib

    matplotlib.use("Agg")  # no display on a benchmark box
    import matplotlib.pyplot as plt

    PLOTS.mkdir(exist_ok=True)
    return plt
