"""What the CLI prints: sizes, ages, explanations, du records (progress: ``progress``)."""
from __future__ import annotations

import json
import os
import time


def human(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.2f}{unit}"
        n /= 1000
    return str(n)


def when(t: float) -> str:
    age = time.time() - t
    for secs, unit in ((86400, "days"), (3600, "hours"), (60, "minutes")):
        if age >= secs:
            return f"{int(age // secs)} {unit} ago"
    return f"{int(age)} seconds ago"


def du_dict(s) -> dict:
    return {"id": s.row.id, "kind": s.row.kind + (f" ({s.row.strategy})" if s.row.strategy else "")
            + (" (packed)" if s.row.packed else ""),
            "parents": ";".join(s.parents), "names": ";".join(s.names),
            "created": s.row.created, "last_used": s.row.last_used,
            "usage_count": s.row.use_count, "reclaimable": s.reclaimable,
            "exclusive": s.exclusive, "shared": s.shared, "size": s.size,
            "description": s.row.description, "state": s.row.state}


def print_explanation(path: bytes, rows, layer_names: list[str], as_json: bool) -> None:
    """Shared by the directory and store forms of explain."""
    shown = "/" + os.fsdecode(path)
    supplier = next((r for r in rows if r.status == "supplies"), None)
    if as_json:
        print(json.dumps({"path": shown,
                          "supplied_by": None if supplier is None else supplier.layer,
                          "layers": [{"layer": r.layer, "source": layer_names[r.layer],
                                      "holds": r.kind, "status": r.status, "reason": r.reason}
                                     for r in rows]}))
        return
    if supplier is None:
        print(f"{shown}: not in the merged view")
    else:
        print(f"{shown}: {supplier.kind} from layer {supplier.layer} ({layer_names[supplier.layer]})")
    for r in rows:
        if r.status == "absent" and r.kind == "nothing":
            continue
        tail = f": {r.reason}" if r.reason else ""
        print(f"  layer {r.layer:<3} {r.kind:<10} {r.status}{tail}  ({layer_names[r.layer]})")


def print_du(u, verbose: bool = False, as_json: bool = False) -> None:
    """``mergefs du``: per snapshot (largest first), then the totals."""
    recs = sorted(u.snapshots, key=lambda s: (-s.size, s.row.id))
    if as_json:
        print(json.dumps({"snapshots": [du_dict(s) for s in recs], "total": u.total,
                          "exclusive": u.exclusive, "shared": u.shared,
                          "reclaimable": u.reclaimable, "overhead": u.overhead,
                          "blobs": u.blobs, "blob_count": u.blob_count,
                          "packed_blobs": u.packed}))
        return
    if verbose:
        for s in recs:
            for k, v in du_dict(s).items():
                label = "ID" if k == "id" else k.replace("_", " ").capitalize()
                if k in ("exclusive", "shared", "size"):
                    v = human(v)
                elif k == "created" and v:
                    v = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(v))
                elif k == "last_used" and v:
                    v = when(v)
                print(f"{label + ':':<14}{v}")
            print()
    else:
        print(f"{'ID':<20} {'KIND':<7} {'RECLAIMABLE':<12} {'EXCLUSIVE':>10} {'SHARED':>10}  "
              "LAST ACCESSED")
        for s in recs:
            kind = "packed" if s.row.packed else s.row.kind       # a layer kept as its blob
            print(f"{s.row.id[7:26]:<20} {kind:<7} {str(s.reclaimable).lower():<12} "
                  f"{human(s.exclusive):>10} {human(s.shared):>10}  {when(s.row.last_used)}")
    print(f"{'Exclusive:':<14}{human(u.exclusive)}\n{'Shared:':<14}{human(u.shared)}\n"
          f"{'Reclaimable:':<14}{human(u.reclaimable)}\n"
          f"{'Blobs:':<14}{human(u.blobs)} ({u.blob_count} layer blobs kept for push"
          + (f"; {human(u.packed)} of them packed layers' content, counted above"
             if u.packed else "") + ")\n"
          f"{'Overhead:':<14}{human(u.overhead)}\n"
          f"{'Total:':<14}{human(u.total)}")
