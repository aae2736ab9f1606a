"""Implementations of Merge that the conformance suite runs against."""
from __future__ import annotations

import itertools
import os

import pytest

from mergefs import syscalls
from mergefs.farm import build_farm
from mergefs.testing import model, mounts, tree
from mergefs.testing.builders import materialise_stack

from ..conftest import require

_seq = itertools.count()


def inject_link_error(monkeypatch, err: int) -> list:
    """Make link() from a layer fail with ``err``; links inside the farm still work.
    Returns the names whose link failed (in this process)."""
    real, calls = syscalls.link, []

    def link(src, dst, src_dir_fd, dst_dir_fd):
        if src_dir_fd != dst_dir_fd:
            calls.append(src)
            raise OSError(err, os.strerror(err), src)
        return real(src, dst, src_dir_fd, dst_dir_fd)
    monkeypatch.setattr(syscalls, "link", link)
    return calls


def model_merge(specs):
    return tree.model_view(model.merge(specs))


def farm_merge(tmp_path, fmt):
    def merge(specs):
        where = tmp_path / f"s{next(_seq)}"
        layers = materialise_stack(specs, where, fmt)
        prints = [tree.fingerprint(l) for l in layers]
        build_farm(layers, where / "farm")
        view = tree.capture(where / "farm")
        assert [tree.fingerprint(l) for l in layers] == prints, "a layer was modified"
        return view
    return merge


def overlay_merge(tmp_path):
    def merge(specs):
        where = tmp_path / f"s{next(_seq)}"
        layers = materialise_stack(specs, where, "overlay")
        with mounts.overlay_mount(layers) as mnt:
            return tree.capture(mnt)
    return merge


IMPLEMENTATIONS = ["model", "farm-overlay", "farm-oci", "kernel-overlay"]


@pytest.fixture(params=IMPLEMENTATIONS)
def merge_impl(request, tmp_path):
    """(name, merge callable) for each implementation; root-only ones skip otherwise."""
    name = request.param
    if name == "model":
        return name, model_merge
    if name == "kernel-overlay":
        require("overlay")
        return name, overlay_merge(tmp_path)
    return name, farm_merge(tmp_path, name.split("-")[1])
