"""Benchmark results as data, written as they are measured: JSON-lines rows, markdown tables, one ``Report`` per run.

Imports no torch: ``gpu_check.sh``'s machinery and its tests use it without paying for torch's import.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any


def append_rows(path: str | os.PathLike, rows: Iterable[dict[str, Any]]) -> Path:
    """Append rows to a JSON-lines file (created with its folder if missing)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, sort_keys=True, default=str) + "\n")
    return path


def read_rows(path: str | os.PathLike) -> list[dict[str, Any]]:
    with Path(path).open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if value != value:  # NaN
            return "n/a"
        if value != 0 and abs(value) < 0.01:
            return f"{value:.1e}"
        return f"{value:,.2f}" if abs(value) < 100 else f"{value:,.0f}"
    return str(value).replace("|", "\\|")


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """Render ``rows`` as a GitHub markdown table with the given columns (missing cells left blank)."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(column)) for column in columns) + " |")
    return "\n".join(lines)


def environment_line(env: dict[str, Any]) -> str:
    """One line naming the hardware and versions (those ``env`` has), to put above a table."""
    parts = [env.get("device", "unknown device")]
    for name, label in (("torch", "torch"), ("cuda", "CUDA"), ("triton", "triton"), ("transformers", "transformers"),
                        ("blip_fast_commit", "blip_fast")):
        if env.get(name):
            parts.append(f"{label} {env[name]}")
    if env.get("date"):
        parts.append(env["date"])
    return ", ".join(parts)


class Report:
    """The rows of one benchmark run, written as they are measured.

    ``add`` appends each row to ``<out_dir>/<name>.jsonl`` at once (flushed), rewrites ``<name>.md`` and prints a
    one-line digest, so a run killed by its time limit (``gpu_check.sh``) leaves every finished row on disk and in
    its log. ``title`` is a string or a function of the first row (which carries the environment).
    """

    def __init__(self, out_dir: str | os.PathLike | None, name: str, columns: Sequence[str],
                 title: str | Callable[[dict[str, Any]], str]) -> None:
        self.out_dir, self.name, self.columns, self.title = out_dir, name, list(columns), title
        self.rows: list[dict[str, Any]] = []

    def add(self, *rows: dict[str, Any]) -> None:
        self.rows.extend(rows)
        for row in rows:
            print(f"[{self.name}] " + ", ".join(f"{column}={_cell(row[column])}" for column in self.columns
                                               if row.get(column) is not None), flush=True)
        if self.out_dir:
            append_rows(Path(self.out_dir) / f"{self.name}.jsonl", rows)
            (Path(self.out_dir) / f"{self.name}.md").write_text(self.text(), encoding="utf-8")

    def text(self) -> str:
        """The markdown report of the rows so far (title, environment line, table)."""
        if not self.rows:
            return ""
        title = self.title(self.rows[0]) if callable(self.title) else self.title
        return (f"### {title}\n\n" + environment_line(self.rows[0]) + "\n\n"
                + markdown_table(self.rows, self.columns) + "\n")
