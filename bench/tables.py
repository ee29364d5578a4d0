"""Markdown and CSV tables of benchmark frames."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from gex.runs import atomic_write_text

__all__ = ["markdown_table", "write_table"]


def cell(value: Any) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.4g}"
    return str(value).replace("|", "/")



def markdown_table(frame: pd.DataFrame) -> str:
    """A GitHub Markdown table of ``frame`` (floats to 4 significant digits, NaN blank)."""
    if frame.empty:
        return "(empty)"
    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)



def write_table(frame: pd.DataFrame, stem: Path) -> str:
    """Write ``<stem>.csv`` and ``<stem>.md``; return the Markdown."""
    frame.to_csv(stem.with_suffix(".csv"), index=False)
    text = markdown_table(frame)
    atomic_write_text(text + "\n", stem.with_suffix(".md"))
    return text
