"""A lazy pull's one-copy path: one ``skopeo copy`` of the image, started with the inspect.

A pull must know the manifest before it fetches anything (which layers does
the store lack?), and asking skopeo for it costs a process and a round trip
(~0.25 s, measured: a third of what a lazy pull adds to ``skopeo copy``). When
the store's blobs say exactly which layers it has, that wait is not needed:
``Speculative`` starts ``skopeo copy`` of the whole image into a fresh OCI
layout seeded with hardlinks of the blobs of the store's committed layers
(skopeo reuses a blob the destination has, without reading it, so it
downloads only the others) at the same time as the inspect. Once the plan is known, the copy is kept only if every layer
the store has is there by its blob digest (then it fetches exactly the
missing layers); otherwise it is killed before most of a byte moved and the
per-layer path runs.

Used only for a lazy pull whose store has no layer without a kept blob (so a
layer stored from a directory, which has no blob, can never be fetched
again), at most ``MAX_SEED`` blobs, and unless ``MERGEFS_PULL_JOBS`` asks for
a number of downloads. While skopeo runs, each finished blob (skopeo renames
a blob into the layout only once its digest checked) is published as a
packed layer as soon as it appears, and once more after skopeo exits,
whatever its status: an interrupted pull keeps every finished layer.
"""
from __future__ import annotations

import json
import os
import threading

from . import meta
from .blobs import blob_dir

MAX_SEED = 256           # blobs hardlinked into the layout (each a link and an unlink)
POLL_S = 0.05


def wanted(store, unpack: bool) -> bool:
    """Whether a pull may start its copy before it knows the plan."""
    if unpack or os.environ.get("MERGEFS_PULL_JOBS"):
        return False
    blobless = store.db.execute(
        "SELECT 1 FROM snapshots s WHERE s.kind IN ('layer', 'diff') AND s.state = 'committed' "
        "AND NOT EXISTS (SELECT 1 FROM layer_blobs b WHERE b.layer = s.id) LIMIT 1").fetchone()
    return blobless is None and len(_blob_names(store)) <= MAX_SEED


def _blob_names(store) -> list[str]:
    """Blobs of committed layers (skopeo reuses a seeded blob without reading it, so
    never one of a corrupt layer, nor a file no layer names)."""
    return sorted(d.split(":", 1)[1] for (d,) in store.db.execute(
        "SELECT DISTINCT b.digest FROM layer_blobs b JOIN snapshots s ON s.id = b.layer "
        "AND s.state = 'committed'"))


class Speculative:
    """``skopeo copy`` of ``target`` into a layout seeded with the store's blobs."""

    def __init__(self, store, client, target):
        self.staged = store.stage("pull")
        self.layout = self.staged.path / "oci"
        self.bdir = self.layout / "blobs" / "sha256"
        os.makedirs(self.bdir)
        self.seeded = set()
        for name in _blob_names(store):
            try:
                os.link(blob_dir(store) / name, self.bdir / name)
                self.seeded.add("sha256:" + name)
            except OSError:
                pass            # gone meanwhile: skopeo fetches it if the image has it
        (self.layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
        (self.layout / "index.json").write_text('{"schemaVersion":2,"manifests":[]}')
        self.proc = client.copy(target.docker(), f"oci:{self.layout}:pull", target, push=False)

    def covers(self, plan, missing: list[int]) -> bool:
        """Every layer the store has is seeded: the copy fetches only ``missing`` ones."""
        gone = set(missing)
        return all(d["digest"] in self.seeded for i, d in enumerate(plan.layers)
                   if i not in gone)

    def cancel(self) -> None:
        from .distribution import stop
        stop(self.proc)
        self.staged.discard()

    def fetch(self, plan, missing: list[int], keep) -> list:
        """Publish each missing layer (``keep(i, path)``) as its blob lands; the results,
        in ``missing``'s order. skopeo's error is raised once every finished layer is
        kept."""
        from .distribution import RegistryError
        done, err = self._run(plan, missing, keep)
        if err is not None:
            raise err
        absent = [plan.layers[i]["digest"][:19] for i in missing if i not in done]
        if absent:
            raise RegistryError(f"pull of {plan.target} failed: skopeo's copy lacks "
                                f"{', '.join(absent)}")
        return [done[i] for i in missing]

    def _run(self, plan, missing: list[int], keep) -> tuple[dict, BaseException | None]:
        from .distribution import result
        done: dict = {}
        stop = threading.Event()
        failure: list[BaseException] = []

        def sweep() -> None:
            for i in missing:
                if i in done:
                    continue
                d = plan.layers[i]
                path = self.bdir / d["digest"].split(":", 1)[1]
                try:
                    if path.stat().st_size != d["size"]:
                        continue
                except FileNotFoundError:
                    continue
                done[i] = keep(i, path)

        def watch() -> None:
            try:
                while not stop.wait(POLL_S):
                    sweep()
            except BaseException as e:    # noqa: BLE001 - raised by run()
                failure.append(e)
        watcher = threading.Thread(target=watch, name="mergefs-pull-watch", daemon=True)
        watcher.start()
        err = None
        try:
            result(self.proc, f"pull of {plan.target} failed")
        except BaseException as e:        # noqa: BLE001 - the finished layers first
            err = e
        finally:
            stop.set()
            watcher.join()
        if failure:
            raise failure[0]
        sweep()
        if err is None and self._manifest() not in (None, plan.manifest_digest):
            from .distribution import RegistryError
            err = RegistryError(f"pull of {plan.target}: the tag moved while it was copied; "
                                "retry")
        return done, err

    def _manifest(self) -> str | None:
        try:
            index = json.loads((self.layout / "index.json").read_text())
            return index["manifests"][0]["digest"]
        except (OSError, ValueError, KeyError, IndexError):
            return None
