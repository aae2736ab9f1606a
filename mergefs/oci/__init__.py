"""OCI import and export (placeholder docstring, completed below)."""
from ._extract import ExtractResult, clean_path, extract_layer
from ._image import Image, LayerDescriptor, detect_source, open_image
from ._export import ExportedImage, LayerBlob, export_layer_tar, export_layout, write_layer_tar
