"""XNAT catalog XML: read a scan's ``scan_<n>_catalog.xml`` or an assessor's ``SEG_catalog.xml``; write them.

XNAT keeps one catalog per resource (namespace ``http://nrg.wustl.edu/catalog``)::

    <cat:DCMCatalog UID="<SeriesInstanceUID>">           scans: one entry per instance
      <cat:entries>
        <cat:entry URI="1-001.dcm" UID="<SOPInstanceUID>" format="DICOM" content="RAW"/>
    <cat:Catalog>                                        assessors (e.g. a SEG)
      <cat:entries>
        <cat:entry URI="SEG_x.dcm" createdBy="user" createdTime="2024-01-18T23:52:51.346-05:00" .../>

Only attributes are read, without regard to namespace prefixes. Writing is for test fixtures and
for anyone who wants to lay files out the way XNAT exports them.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from xml.sax.saxutils import quoteattr

from node.errors import NodeError

CATALOG_NS = "http://nrg.wustl.edu/catalog"
XSI_NS = "http://www.w3.org/2001/XMLSchema-instance"


class CatalogError(NodeError, ValueError):
    """A catalog file that cannot be read; ``code`` is stable for programs."""


@dataclass(frozen=True)
class CatalogEntry:
    """One ``cat:entry``: a file of the resource."""

    uri: str
    uid: str | None = None
    created_by: str | None = None
    created_time: str | None = None
    format: str | None = None
    content: str | None = None
    attributes: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Catalog:
    """A parsed catalog: ``kind`` is the root element (``DCMCatalog`` or ``Catalog``)."""

    path: Path
    kind: str
    uid: str | None
    entries: tuple[CatalogEntry, ...]

    @property
    def created_by(self) -> str | None:
        """The first entry's ``createdBy`` (an assessor's author)."""
        return next((e.created_by for e in self.entries if e.created_by), None)

    @property
    def created_time(self) -> str | None:
        """The first entry's ``createdTime`` (an assessor's creation time, ISO 8601)."""
        return next((e.created_time for e in self.entries if e.created_time), None)


def _local(tag: str) -> str:
    """``{namespace}name`` or ``prefix:name`` -> ``name``."""
    return tag.rsplit("}", 1)[-1].rsplit(":", 1)[-1]


def _attrs(element: ET.Element) -> dict[str, str]:
    return {_local(k): v for k, v in element.attrib.items()}


def read_catalog(path: Path) -> Catalog:
    """Parse ``path``; :class:`CatalogError` ``catalog_unreadable`` or ``catalog_invalid`` if it cannot be."""
    path = Path(path)
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as exc:
        raise CatalogError("catalog_unreadable", f"{path.name}: not readable as XML ({exc})") from None
    kind = _local(root.tag)
    if "catalog" not in kind.lower():
        raise CatalogError("catalog_invalid", f"{path.name}: root element is <{root.tag}>, not an XNAT catalog")
    entries = []
    for element in root.iter():
        if _local(element.tag) != "entry":
            continue
        a = _attrs(element)
        entries.append(CatalogEntry(
            uri=a.get("URI", ""), uid=a.get("UID"), created_by=a.get("createdBy"),
            created_time=a.get("createdTime"), format=a.get("format"), content=a.get("content"), attributes=a,
        ))
    return Catalog(path=path, kind=kind, uid=_attrs(root).get("UID"), entries=tuple(entries))


def find_catalog(folder: Path, *, also_parent: bool = True) -> Path | None:
    """The catalog XML in ``folder`` (``*catalog*.xml`` first, then any ``.xml``), else in its parent."""
    folder = Path(folder)
    places = [folder, folder.parent] if also_parent else [folder]
    for place in places:
        if not place.is_dir():
            continue
        xmls = sorted(p for p in place.iterdir() if p.is_file() and p.suffix.lower() == ".xml")
        named = [p for p in xmls if "catalog" in p.name.lower()]
        if named or xmls:
            return (named or xmls)[0]
    return None


# --- writing -------------------------------------------------------------------------------


def _xml(root: str, root_attrs: dict[str, str], entries: list[dict[str, str]]) -> str:
    def attrs(d: dict[str, str]) -> str:
        return "".join(f" {k}={quoteattr(str(v))}" for k, v in d.items() if v is not None)

    lines = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        f'<cat:{root} xmlns:cat="{CATALOG_NS}" xmlns:xsi="{XSI_NS}"{attrs(root_attrs)}>',
        "  <cat:entries>",
        *(f"    <cat:entry{attrs(e)}/>" for e in entries),
        "  </cat:entries>",
        f"</cat:{root}>",
    ]
    return "\n".join(lines) + "\n"


def scan_catalog_xml(series_uid: str, files: list[tuple[str, str]]) -> str:
    """A scan's ``cat:DCMCatalog``: ``files`` are (file name, SOPInstanceUID) in instance order."""
    entries = [
        {"xsi:type": "cat:dcmCatalogEntry", "UID": uid, "URI": name, "ID": f"{n}", "format": "DICOM",
         "content": "RAW", "instanceNumber": str(n)}
        for n, (name, uid) in enumerate(files, 1)
    ]
    return _xml("DCMCatalog", {"UID": series_uid}, entries)


def seg_catalog_xml(file_name: str, created_by: str, created_time: str, digest: str | None = None) -> str:
    """An assessor's ``cat:Catalog`` with its one SEG file, as XNAT's OHIF viewer saves it."""
    entry = {"URI": file_name, "ID": file_name, "createdTime": created_time, "createdBy": created_by,
             "digest": digest, "format": "DICOM", "content": "SEG"}
    return _xml("Catalog", {}, [entry])
