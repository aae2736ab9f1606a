"""The README demo: sample layers -> a hardlink farm -> the merged tree, annotated.

    python tools/demo.py [DIR]     (default ./demo-out, replaced on each run)

The layers exercise a whiteout, an opaque directory, a hardlink pair, a
symlink and a directory/file type change, in both whiteout formats.
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from mergefs.explain import explain
from mergefs.farm import build_farm
from mergefs.layer import DIR, KIND_NAMES, Layer
from mergefs.resolver import Resolver, join
from mergefs.testing.builders import LayerSpec, materialise

LAYERS = [
    ("base (overlay format)", "overlay", LayerSpec()
     .file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
     .file("etc/motd", b"welcome\n")
     .file("bin/busybox", b"\x7fELF...", mode=0o755).hardlink("bin/sh", "bin/busybox")
     .file("var/cache/apt/pkgcache.bin", b"cache" * 100)
     .dir("opt/tool").file("opt/tool/README", b"old tool\n")
     .file("srv", b"srv was a file\n")),
    ("update (OCI format)", "oci", LayerSpec()
     .whiteout("etc/motd")
     .opaque_dir("var/cache").file("var/cache/fresh", b"new cache\n")
     .file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n")
     .dir("srv", mode=0o750).file("srv/index.html", b"<h1>hi</h1>\n")),
    ("app (overlay format)", "overlay", LayerSpec()
     .symlink("opt/tool", "/usr/local/tool")
     .file("home/app/config", b"debug=0\n", uid=1000, gid=1000)),
]


def _tree_lines(resolver: Resolver, names: list[str]) -> list[str]:
    lines = []

    def walk(path: bytes, node, depth: int) -> None:
        for name, child in resolver.listdir(path, node).items():
            cpath = join(path, name)
            kind = KIND_NAMES[child.kind]
            label = os.fsdecode(name) + ("/" if child.kind == DIR else "")
            extra = ""
            if kind == "symlink":
                extra = f" -> {os.fsdecode(os.readlink(resolver.layers[child.top].path + b'/' + cpath))}"
            src = ("+".join(map(str, resolver.dir_layers(cpath, child))) if child.kind == DIR
                   else str(child.top))
            lines.append(f"{'  ' * depth}{label}{extra:<30}".ljust(44)
                         + f"{kind:<8} layer {src}")
            if child.kind == DIR:
                walk(cpath, child, depth + 1)

    walk(b"", resolver.root, 0)
    return lines


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    where = Path(argv[0] if argv else "demo-out").absolute()
    shutil.rmtree(where, ignore_errors=True)
    where.mkdir(parents=True)
    paths = []
    print("Layers (bottom first):")
    for i, (title, fmt, spec) in enumerate(LAYERS):
        paths.append(materialise(spec, where / f"layer{i}", fmt))
        print(f"  layer {i}: {paths[-1]}  {title}")
    farm = where / "merged"
    stats = build_farm(paths, farm)
    print(f"\nFarm at {farm}: {stats.dirs} directories made, {stats.links} hardlinks, "
          f"{sum(stats.copies.values())} copies\n")
    print("Merged tree (directories list every layer they merge from, top first):")
    with Resolver([Layer(p) for p in paths]) as r:
        for line in _tree_lines(r, [str(p) for p in paths]):
            print("  " + line)
        print("\nWhy some paths look the way they do (mergefs explain):")
        for path in (b"etc/motd", b"var/cache/apt", b"srv", b"opt/tool"):
            rows = explain(r, path)
            sup = next((x for x in rows if x.status == "supplies"), None)
            head = f"layer {sup.layer} supplies a {sup.kind}" if sup else "not in the merged view"
            print(f"  /{os.fsdecode(path)}: {head}")
            for x in rows:
                if x.status == "hidden":
                    print(f"      layer {x.layer}'s {x.kind}: {x.reason}")
    same = os.stat(farm / "bin/sh").st_ino == os.stat(farm / "bin/busybox").st_ino
    shared = os.stat(farm / "bin/sh").st_ino == os.stat(paths[0] / "bin/sh").st_ino
    print(f"\nbin/sh and bin/busybox are one inode: {same}; shared with layer 0: {shared}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
