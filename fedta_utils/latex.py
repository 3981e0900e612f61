"""LaTeX text from results, and the PDF build.

Formatting: escaping, numbers (percentages, signed gaps in points,
scientific notation, thousands separators), sharding labels and booktabs
tabulars, so every generated table and macro looks the same. Building:
latexmk on the report, and the page counts read back from its log and .aux.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

BODY_PAGE_LIMIT = 8  # the course's limit, references excluded
NA = r"\textit{n/a (no results)}"  # the text of a number whose experiment has no results yet


LATEX_SPECIALS = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def latex_escape(text) -> str:
    """Text with LaTeX's special characters escaped, safe in text mode."""
    return "".join(LATEX_SPECIALS.get(char, char) for char in str(text))


def is_macro_name(name: str) -> bool:
    """LaTeX control words are letters only."""
    return bool(re.fullmatch(r"[A-Za-z]+", name))


def percent(mean: float, std: float) -> str:
    """Text-mode 'mean +- std %' of an accuracy given as a fraction."""
    return f"{mean * 100:.1f}\\,$\\pm$\\,{std * 100:.1f}\\,\\%"


def cell(mean: float, std: float) -> str:
    """A table cell 'mean +- std' in percent (the header carries the unit)."""
    if pd.isna(mean):
        return "--"
    return f"${mean * 100:.1f} \\pm {std * 100:.1f}$"


def single_percent(value: float) -> str:
    return f"{value * 100:.1f}\\,\\%"


def points(value: float) -> str:
    """A signed difference of two accuracies (fractions), in percentage points."""
    return f"${value * 100:+.1f}$"


def number(value) -> str:
    """A plain number: scientific notation when it is tiny or huge, else the shortest form."""
    value = float(value)
    if value == 0 or 1e-3 <= abs(value) < 1e5:
        return f"{value:g}"
    mantissa, exponent = f"{value:.2e}".split("e")
    return f"${float(mantissa):g}\\times10^{{{int(exponent)}}}$"


def scientific(value) -> str:
    """Always a x 10^b with three significant digits (Fisher thresholds span many decades)."""
    mantissa, exponent = f"{float(value):.2e}".split("e")
    return f"${mantissa}\\times10^{{{int(exponent)}}}$"


def integer(value) -> str:
    """An integer with a thin thousands separator: 45{,}000."""
    return f"{int(value):,}".replace(",", "{,}")


def listing(values) -> str:
    return ", ".join(number(v) for v in values)


def sharding_tex(label: str) -> str:
    """'Nc=5' -> '$N_c{=}5$', 'Dir(alpha=0.1)' or 'Dir(0.1)' -> 'Dir($\\alpha{=}0.1$)', 'iid' -> 'iid'."""
    label = str(label)
    if match := re.fullmatch(r"Nc=(\d+)", label):
        return f"$N_c{{=}}{match.group(1)}$"
    if match := re.fullmatch(r"Dir\((?:alpha=)?([0-9.e-]+)\)", label):
        return f"Dir($\\alpha{{=}}{match.group(1)}$)"
    return latex_escape(label)


def value_range(low, high) -> str:
    """'18' when both ends agree, else '15--20'."""
    return str(low) if low == high else f"{low}--{high}"


def setting_tex(label: str, local_steps) -> str:
    return f"{sharding_tex(label)}, $J{{=}}{int(local_steps)}$"


def seeds_text(count: int) -> str:
    return f"{count} seed{'s' if count != 1 else ''}"


def count_range(counts) -> str:
    """Seeds per cell: '3', or '2--3' when cells differ."""
    return value_range(int(min(counts)), int(max(counts)))


def booktabs(header: list[str], rows: list[list[str]], align: str,
             groups: list[tuple[str, int]] | None = None) -> str:
    """A booktabs tabular; cells are LaTeX already (escape text with latex_escape first).

    groups: an optional first header row of (label, columns spanned), each
    labelled group underlined with a \\cmidrule.
    """
    lines = [f"\\begin{{tabular}}{{{align}}}", "\\toprule"]
    if groups:
        lines += group_header(groups)
    lines += [" & ".join(header) + " \\\\", "\\midrule"]
    lines += [" & ".join(row) + " \\\\" for row in rows]
    lines += ["\\bottomrule", "\\end{tabular}", ""]
    return "\n".join(lines)


def group_header(groups: list[tuple[str, int]]) -> list[str]:
    cells, rules, column = [], [], 1
    for label, span in groups:
        cells.append(label if span == 1 else f"\\multicolumn{{{span}}}{{c}}{{{label}}}")
        if label:
            rules.append(f"\\cmidrule(lr){{{column}-{column + span - 1}}}")
        column += span
    return [" & ".join(cells) + " \\\\", "".join(rules)]


# --------------------------------------------------------------------------- building

@dataclass
class BuildResult:
    """What latexmk did: success, wall time, page counts and the end of its log."""

    ok: bool
    seconds: float
    pages: int | None
    body_pages: int | None
    log_tail: str


def build_pdf(report_dir: str | Path, timeout: int = 600) -> BuildResult:
    """latexmk -pdf on <report_dir>/main.tex; raises FileNotFoundError when latexmk is not installed."""
    if shutil.which("latexmk") is None:
        raise FileNotFoundError("latexmk is not installed: install TeX Live (e.g. apt-get install latexmk "
                                "texlive-latex-extra texlive-fonts-recommended texlive-bibtex-extra)")
    report_dir = Path(report_dir)
    started = time.perf_counter()
    process = subprocess.run(["latexmk", "-pdf", "-interaction=nonstopmode", "-halt-on-error", "main.tex"],
                             cwd=report_dir, capture_output=True, text=True, timeout=timeout)
    seconds = time.perf_counter() - started
    tail = "\n".join((process.stdout + process.stderr).splitlines()[-40:])
    return BuildResult(process.returncode == 0, seconds, pdf_pages(report_dir / "main.log"),
                       body_pages(report_dir / "main.aux"), tail)


def pdf_pages(log: Path) -> int | None:
    """Pages of the PDF, from pdflatex's 'Output written on main.pdf (N pages, ...)' line."""
    if not log.is_file():
        return None
    match = re.search(r"Output written on \S+ \((\d+) pages?", log.read_text(errors="replace"))
    return int(match.group(1)) if match else None


def body_pages(aux: Path, label: str = "LastBodyPage") -> int | None:
    """The page of `label` (placed at the end of the body, before the references), from the .aux file."""
    if not aux.is_file():
        return None
    match = re.search(r"\\newlabel\{" + label + r"\}\{\{[^}]*\}\{(\d+)\}", aux.read_text(errors="replace"))
    return int(match.group(1)) if match else None
