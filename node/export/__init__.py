"""Export: the outbox (durable, retried deliveries of a job's DICOM results) and its senders
(DICOMweb STOW-RS, DICOM C-STORE, a folder). See :mod:`node.export.outbox`."""

from node.export.outbox import Outbox, backoff, dicom_files
from node.export.senders import DeliveryError, Failure, Item

__all__ = ["DeliveryError", "Failure", "Item", "Outbox", "backoff", "dicom_files"]
