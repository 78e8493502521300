"""Which XNAT segmentations to use: by name or folder, or from a spreadsheet (CSV or XLSX).

A segmentation is chosen by its exported name (the SEG's SeriesDescription, what the segmentor
typed when saving) or by its assessor folder (``SEG_20240118_235251_213_S2``), without regard to
case. A spreadsheet has a column for the case (the case folder name, e.g. 2072) and one for a name
or a list of names written as a string (``"['verified', 'final']"``); an empty cell selects every
segmentation of that case, and cases that are not in the sheet are left out. Names given on the
command line (``--name``) are asked for in every case, in addition to the sheet's.
"""

from __future__ import annotations

import ast
import csv
from dataclasses import dataclass, field
from pathlib import Path

CASE_COLUMNS = ("case", "case_id", "case id", "caseid", "case_number", "case number", "case no", "session",
                "subject", "folder")
NAME_COLUMNS = ("segmentation", "segmentations", "segmentation_name", "segmentation_names", "segmentation name",
                "segmentation names", "seg", "segs", "names", "name")


class SelectionError(ValueError):
    """A selection that cannot be read; ``code`` is stable for programs."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def normalize_case(value: object) -> str:
    """A case cell as the folder name it stands for: 2072, 2072.0 and " 2072 " are "2072"."""
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def parse_names(cell: object) -> list[str]:
    """A name cell as a list of names: ``"['a', 'b']"``, ``"('a',)"``, ``"a"``; empty gives []."""
    if cell is None:
        return []
    if isinstance(cell, (list, tuple)):
        return [str(v).strip() for v in cell if str(v).strip()]
    if isinstance(cell, float) and cell.is_integer():
        cell = int(cell)
    text = str(cell).strip()
    if not text:
        return []
    if text[0] in "[(":
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = [part.strip().strip("'\"") for part in text.strip("[]()").split(",")]
        if isinstance(value, str):
            value = [value]
        return [str(v).strip() for v in value if str(v).strip()]
    return [text]


def _pick(headers: list[str], wanted: str | None, candidates: tuple[str, ...], what: str, path: Path) -> int:
    folded = [h.strip().casefold() for h in headers]
    if wanted is not None:
        if wanted.strip().casefold() in folded:
            return folded.index(wanted.strip().casefold())
        raise SelectionError("no_column", f"{path.name}: no {what} column {wanted!r}; columns: {headers}")
    for name in candidates:
        if name in folded:
            return folded.index(name)
    raise SelectionError(
        "no_column", f"{path.name}: no {what} column (tried {', '.join(candidates[:4])}, ...); columns: {headers}; "
        f"name it with --{what}-column")


def _rows(path: Path, sheet: str | None) -> list[list[object]]:
    suffix = path.suffix.lower()
    if suffix in (".xlsx", ".xlsm"):
        from openpyxl import load_workbook

        try:
            book = load_workbook(path, read_only=True, data_only=True)
        except Exception as exc:  # noqa: BLE001 - openpyxl raises many kinds
            raise SelectionError("sheet_unreadable", f"{path.name}: not a readable XLSX workbook ({exc})") from None
        try:
            if sheet is not None and sheet not in book.sheetnames:
                raise SelectionError("no_sheet", f"{path.name}: no sheet {sheet!r}; sheets: {book.sheetnames}")
            ws = book[sheet] if sheet is not None else book.worksheets[0]
            return [list(row) for row in ws.iter_rows(values_only=True)]
        finally:
            book.close()
    if suffix in (".csv", ".tsv", ".txt"):
        text = path.read_text(encoding="utf-8-sig")
        try:
            dialect = csv.Sniffer().sniff(text[:4096], delimiters=",;\t")
        except csv.Error:
            dialect = csv.excel_tab if suffix == ".tsv" else csv.excel
        return [list(row) for row in csv.reader(text.splitlines(), dialect)]
    raise SelectionError("sheet_format", f"{path.name}: a selection sheet must be .csv, .tsv or .xlsx")


def read_sheet(
    path: Path, case_column: str | None = None, name_column: str | None = None, sheet: str | None = None
) -> dict[str, tuple[str, ...]]:
    """Case -> names from a CSV/XLSX sheet; the first non-empty row holds the column names.

    Several rows of one case add up; a case whose name cells are all empty selects all its SEGs.
    """
    path = Path(path)
    if not path.is_file():
        raise SelectionError("not_found", f"{path} does not exist")
    rows = [r for r in _rows(path, sheet) if any(c not in (None, "") for c in r)]
    if not rows:
        raise SelectionError("empty_sheet", f"{path.name} has no rows")
    headers = ["" if h is None else str(h) for h in rows[0]]
    if case_column is None and name_column is None and len(headers) == 2 and not any(
        h.strip().casefold() in CASE_COLUMNS + NAME_COLUMNS for h in headers
    ):
        case_at, name_at = 0, 1
    else:
        case_at = _pick(headers, case_column, CASE_COLUMNS, "case", path)
        name_at = _pick(headers, name_column, NAME_COLUMNS, "name", path)
    selected: dict[str, list[str]] = {}
    for row in rows[1:]:
        case = normalize_case(row[case_at] if case_at < len(row) else None)
        if not case:
            continue
        names = selected.setdefault(case, [])
        for name in parse_names(row[name_at] if name_at < len(row) else None):
            if name not in names:
                names.append(name)
    return {case: tuple(names) for case, names in selected.items()}


@dataclass(frozen=True)
class Selection:
    """``names`` apply to every case; ``sheet`` (case -> names, empty = all) limits the cases too."""

    names: tuple[str, ...] = ()
    sheet: dict[str, tuple[str, ...]] | None = field(default=None)

    def selects_case(self, case: str) -> bool:
        return self.sheet is None or case in self.sheet

    def names_for(self, case: str) -> tuple[str, ...]:
        """The names asked for in ``case``; () means every segmentation."""
        sheet_names = self.sheet.get(case, ()) if self.sheet is not None else ()
        return tuple(dict.fromkeys((*sheet_names, *self.names)))

    def describe(self) -> dict:
        return {"names": list(self.names), "sheet": None if self.sheet is None else
                {case: list(names) for case, names in self.sheet.items()}}


def match(segmentations: dict[str, dict], names: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """(assessor folders selected, names that matched none), in inventory order.

    A name matches a segmentation's exported name (SeriesDescription) or its folder name.
    """
    if not names:
        return list(segmentations), []
    wanted = {n.strip().casefold() for n in names}
    found: set[str] = set()
    chosen = []
    for folder, info in segmentations.items():
        keys = {folder.casefold(), str(info.get("name") or "").strip().casefold()} & wanted
        if keys:
            chosen.append(folder)
            found |= keys
    return chosen, [n for n in names if n.strip().casefold() not in found]
