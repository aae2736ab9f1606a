"""OCI import and export (placeholder docstring, completed below)."""
from ._extract import ExtractResult, clean_path, extract_layer
