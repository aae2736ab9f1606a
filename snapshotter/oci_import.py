"""Import of tars, OCI layouts and docker archives, through ``mergefs.oci``.

``mergefs.oci`` (another module's owner) unpacks each layer into a directory
and computes its diffID (sha256 of the uncompressed tar); here each unpacked
layer is published like a directory import, under the diffID as its id.
"""
from __future__ import annotations

from mergefs.errors import InvalidLayer

from .store import CLI_HOLDER, Store


def import_archive(store: Store, src: str, name: str | None = None,
                   holder: str | None = CLI_HOLDER) -> list:
    try:
        from mergefs import oci
    except ImportError:
        raise InvalidLayer(f"{src!r}: only layer directories can be imported in this build "
                           "(tar / OCI layout import needs mergefs.oci)") from None
    raise InvalidLayer(f"{src!r}: mergefs.oci is present but not wired into the store yet")
