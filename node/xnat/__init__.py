"""XNAT import: case folders exported from XNAT (``SCANS/<n>/DICOM`` + ``ASSESSORS/<SEG_...>/SEG``)
to JSON inventories, per-object NIfTI on the series' grid, and clean multi-segment DICOM-SEG.

* :mod:`node.xnat.catalog`: XNAT catalog XML (read, and write for fixtures);
* :mod:`node.xnat.inventory`: ``StudySeries_info.json`` and ``Segmentations_info.json`` per case;
* :mod:`node.xnat.select`: which SEGs, by name/folder or from a CSV/XLSX sheet;
* :mod:`node.xnat.export`: ``Curated_Output/*.nii.gz`` (``segnode xnat export``), merges, and
  DICOM-SEG (``segnode xnat to-seg``).
"""

from node.xnat.inventory import XnatError, find_cases, inventory_case, run_inventory
from node.xnat.select import Selection, SelectionError, read_sheet

__all__ = ["Selection", "SelectionError", "XnatError", "find_cases", "inventory_case", "read_sheet",
           "run_inventory"]
