"""segnode: a DICOM segmentation node that sits beside the archive."""

__version__ = "0.1.0"
