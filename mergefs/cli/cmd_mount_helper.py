"""The mount.fuse3 convention: ``mergefs SOURCE MOUNTPOINT -o OPTIONS``.

Owned by the union mount work; until it lands, nothing is recognised.
"""
from __future__ import annotations


def is_mount_helper_call(argv: list[str]) -> bool:
    return False


def translate(argv: list[str]) -> list[str]:
    return argv
