"""This machine's architecture as OCI names it (an image index's ``platform``).

A leaf (``os`` only): the pull's start-up path imports it.
"""
from __future__ import annotations

import os

_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "ppc64le": "ppc64le",
         "s390x": "s390x", "riscv64": "riscv64"}


def oci_architecture() -> str:
    """``amd64`` on x86_64 and so on; an unknown machine name as the kernel gives it."""
    machine = os.uname().machine
    return _ARCH.get(machine, machine)
