#!/usr/bin/env python3
"""Benchmark: OCI export with gzip (every core / one core), zstd and no compression,
against ``tar -cf - | gzip -6`` of the same layers.

    sudo .venv/bin/python tools/bench_export.py [--workdir DIR] [--files 30000]
                                                [--layers 4] [--reps 3]

The stack is ``gen_stack`` (overlay format). Each repetition writes one OCI
layout of all layers with ``mergefs.oci.export_layout`` in a child process
(Python start-up included) per case, and, as the anchor, runs GNU tar piped
into ``gzip -6`` per layer (what the export does by hand, without whiteout
translation or digests); ``pigz -6`` too when it is installed. The caches are
warmed first and the order rotates between repetitions. CPU time is the
child's user+sys (GNU time). On this shared machine other work inflates wall
times: read the ratios against the anchor of the same run. Asserts nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, REPO)

import benchlib  # noqa: E402
import gen_stack  # noqa: E402

CHILD = """
import json, sys, time
t0 = time.perf_counter()
from mergefs.oci import _compress, export_layout
mode, out, layers = sys.argv[1], sys.argv[2], sys.argv[3:]
if mode == "gzip-1":
    _compress.cores = lambda: 1
comp = {"gzip": "gzip", "gzip-1": "gzip", "zstd": "zstd", "none": None}[mode]
img = export_layout(layers, out, compression=comp)
print(json.dumps({"seconds": time.perf_counter() - t0,
                  "bytes": sum(b.size for b in img.layers)}))
"""

CASES = {"gzip": "mergefs export, gzip (every core)",
         "gzip-1": "mergefs export, gzip (one core)",
         "zstd": "mergefs export, zstd -3",
         "none": "mergefs export, no compression"}
ANCHOR = "tar -cf - | gzip -6"


def run_case(mode: str, layers: list[str], out: str) -> benchlib.ChildResult:
    return benchlib.run_child([sys.executable, "-c", CHILD, mode, out, *layers], cwd=REPO)


def run_shell(compressor: str, layers: list[str], out: str) -> benchlib.ChildResult:
    os.mkdir(out)
    script = " && ".join(f"tar --format=posix --xattrs --numeric-owner -C {layer} -cf - . "
                         f"| {compressor} > {out}/l{i}.tar.gz" for i, layer in enumerate(layers))
    return benchlib.run_child(["sh", "-c", script])


CODEC = """
import json, os, sys, time, zlib
from mergefs.oci import _compress
mode, path = sys.argv[1], sys.argv[2]
t0, c0 = time.perf_counter(), time.process_time()
with open(path, "rb") as f:
    if mode == "zlib":
        comp = zlib.compressobj(6, zlib.DEFLATED, 31)
    elif mode == "zstd":
        comp = _compress.zstd_compressobj()
    else:
        comp = _compress.ParallelGzip(1 if mode == "gzip-1" else None)
    size = 0
    while True:
        data = f.read(1 << 20)
        if not data:
            break
        size += len(comp.compress(data))
    size += len(comp.flush())
print(json.dumps({"seconds": time.perf_counter() - t0, "cpu": time.process_time() - c0,
                  "bytes": size}))
"""
CODECS = {"zlib": "zlib gzip -6, one stream (before)", "gzip-1": "block gzip, one thread",
          "gzip": "block gzip, every core", "zstd": "zstd -3, libzstd workers"}


def codec_table(tar: str, reps: int) -> benchlib.Table:
    """The compressors alone on one uncompressed layer tar, in a child process."""
    table = benchlib.Table(f"compressing a {os.path.getsize(tar) / 1e6:.0f} MB layer tar "
                           "(no tar walk), in-process")
    anchor = CODECS["zlib"]
    for rep in range(reps):
        for mode, title in list(CODECS.items())[rep % 4:] + list(CODECS.items())[:rep % 4]:
            r = benchlib.run_child([sys.executable, "-c", CODEC, mode, tar], cwd=REPO)
            out = r.json()
            table.series(title, anchor=None if title == anchor else anchor).add(out["seconds"])
            table.series(f"{title}, CPU").add(out["cpu"])
            table.series(f"{title}, output", unit="B").add(out["bytes"])
    return table


def du(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default="/var/tmp/mergefs-bench-export")
    ap.add_argument("--files", type=int, default=30_000)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--codecs-only", action="store_true", help="only the compressor table")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("bench_export: needs root (the stack has whiteout devices and trusted xattrs)",
              file=sys.stderr)
        return 2
    os.makedirs(args.workdir, exist_ok=True)
    layers = gen_stack.ensure_stack(os.path.join(args.workdir, f"stack-{args.layers}x{args.files}"),
                                    args.layers, args.files)
    subprocess.run(f"tar -cf - {' '.join(layers)} 2>/dev/null | cat > /dev/null", shell=True)
    if args.codecs_only:
        cases = []
    else:
        cases = [(ANCHOR, lambda out: run_shell("gzip -6 -n", layers, out))]
    if shutil.which("pigz") and not args.codecs_only:
        cases.append(("tar -cf - | pigz -6", lambda out: run_shell("pigz -6 -n", layers, out)))
    if not args.codecs_only:
        cases += [(title, lambda out, m=mode: run_case(m, layers, out))
                  for mode, title in CASES.items()]
    data = sum(os.path.getsize(os.path.join(d, f)) for layer in layers
               for d, _, fs in os.walk(layer) for f in fs
               if os.path.isfile(os.path.join(d, f)) and not os.path.islink(os.path.join(d, f)))
    table = benchlib.Table(f"export of {args.layers} layers, {args.files} files, "
                           f"{data / 1e6:.0f} MB of file data; {os.cpu_count()} cores; "
                           f"load average {os.getloadavg()[0]:.1f} at start")
    wall = {name: table.series(name, anchor=None if name == ANCHOR else ANCHOR) for name, _ in cases}
    cpu = {name: table.series(f"{name}, CPU (user+sys)") for name, _ in cases}
    sizes = {}
    for rep in range(args.reps):
        shift = rep % max(len(cases), 1)
        for name, fn in cases[shift:] + cases[:shift]:
            out = os.path.join(args.workdir, "out")
            shutil.rmtree(out, ignore_errors=True)
            r = fn(out)
            wall[name].add(r.seconds)
            if r.cpu_seconds is not None:
                cpu[name].add(r.cpu_seconds)
            sizes[name] = du(out)
            shutil.rmtree(out, ignore_errors=True)
    if cases:
        print(table.render())
    tar = os.path.join(args.workdir, "layer0.tar")
    if not os.path.exists(tar):
        export_layer = "from mergefs.oci import export_layer_tar; import sys; " \
                       "export_layer_tar(sys.argv[1], sys.argv[2])"
        subprocess.run([sys.executable, "-c", export_layer, layers[0], tar], check=True, cwd=REPO)
    print(codec_table(tar, args.reps).render())
    for name, size in sizes.items():
        print(f"  output of {name}: {size / 1e6:.1f} MB")
    print(f"load average at the end: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    if args.json:
        print(json.dumps({**table.as_dict(), "sizes": sizes}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
