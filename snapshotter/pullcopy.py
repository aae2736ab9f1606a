"""A lazy pull's one-copy path: one ``skopeo copy`` of the whole image, started first.

A pull must know the manifest before it fetches anything (which layers does
the store lack?), and asking skopeo for it costs a process and a round trip,
and so does each ``skopeo copy`` of one layer (its start, ping, manifest).
When the store's blobs say exactly which layers it has, none of that has to
come first: ``start`` (called by ``mergefs pull`` before the store's modules
load) starts ``skopeo copy`` of the whole image into a fresh OCI layout in the
store's ``staging/``, seeded with hardlinks of the blobs of the store's
committed layers (skopeo reuses a blob the destination has, without reading
it, so it downloads only the others), at the same time as the inspect of the
manifest and config. Once the plan is known, the copy is kept only if every
layer the store has is seeded and no missing one is (then it fetches exactly
the missing layers); otherwise it is killed and the per-layer path runs.

Used only for a lazy pull whose store has no layer without a kept blob (so a
layer stored from a directory, which has no blob, can never be fetched
again), at most ``MAX_SEED`` blobs, and unless ``MERGEFS_PULL_JOBS`` asks for
a number of downloads. While skopeo runs, each finished blob (skopeo renames
a blob into the layout only once its digest checked) is published as a
packed layer as soon as it appears, and once more after skopeo exits,
whatever its status: an interrupted pull keeps every finished layer.

Light on purpose (``os``, ``json``; ``sqlite3`` and ``meta`` only for a store that
has a database, read-only): the sooner the copy starts, the sooner it ends.
"""
from __future__ import annotations

import json
import os
import threading
from pathlib import Path

from .paths import default_root, staging_name

MAX_SEED = 256           # blobs hardlinked into the layout (each a link and an unlink)
POLL_S = 0.05


def start(root: str | os.PathLike | None, client, target, unpack: bool = False,
          name: str | None = None):
    """The copy of ``target`` into the store at ``root`` (``--root``), started now, or
    None when the store cannot say which layers it has without the plan, or when
    ``name`` (the name the pull records) already names an image whose layers are all
    in the store: most likely nothing to fetch, so no copy to start and kill (if the
    tag moved, the pull starts one once its plan says what is missing)."""
    if unpack or os.environ.get("MERGEFS_PULL_JOBS"):
        return None
    root = Path(default_root(os.fspath(root) if root else None)).absolute()
    names = seeds(root, name)
    if names is None or len(names) > MAX_SEED:
        return None
    try:
        return Speculative(root, names, client, target)
    except OSError:
        return None             # not a usable root: the store says why when it opens


def seeds(root: Path, name: str | None = None) -> list[str] | None:
    """The blob names (hex) a copy into this store starts with, or None when a layer
    has no blob (or the database cannot be read), or when ``name`` names an image whose
    layers are all there."""
    db = root / "meta.db"
    if not db.exists():             # a new store; a lost meta.db is rebuilt at open
        try:
            return None if any(os.scandir(root / "snapshots")) else []
        except FileNotFoundError:
            return []
        except OSError:
            return None
    import sqlite3

    from . import meta
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
        try:
            if name and meta.image_present(con, name):
                return None
            digests = meta.seed_blobs(con)
        finally:
            con.close()
    except sqlite3.Error:
        return None
    return None if digests is None else [d.split(":", 1)[1] for d in digests]


class Speculative:
    """``skopeo copy`` of ``target`` into a layout seeded with the store's blobs."""

    def __init__(self, root: Path, names: list[str], client, target):
        os.makedirs(root, 0o700, exist_ok=True)
        os.makedirs(root / "staging", 0o700, exist_ok=True)
        self.staging = root / "staging" / staging_name("pull")
        os.mkdir(self.staging, 0o700)
        self.proc = None
        try:
            self.layout = self.staging / "oci"
            self.bdir = self.layout / "blobs" / "sha256"
            os.makedirs(self.bdir)
            self.seeded = set()
            for name in names:
                try:
                    os.link(root / "blobs" / "sha256" / name, self.bdir / name)
                    self.seeded.add("sha256:" + name)
                except OSError:
                    pass        # gone meanwhile: skopeo fetches it if the image has it
            (self.layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
            (self.layout / "index.json").write_text('{"schemaVersion":2,"manifests":[]}')
            self.proc = client.copy(target.docker(), f"oci:{self.layout}:pull", target,
                                    push=False)
        except BaseException:
            self.cancel()
            raise

    def covers(self, plan, missing: list[int]) -> bool:
        """Every layer the store has is seeded and no missing one is: the copy fetches
        exactly the ``missing`` layers."""
        gone = set(missing)
        return all((d["digest"] in self.seeded) == (i not in gone)
                   for i, d in enumerate(plan.layers))

    def cancel(self) -> None:
        """Stop the copy (by its pid) and remove its staging."""
        from mergefs import syscalls

        from .distribution import stop
        if self.proc is not None:
            stop(self.proc)
        syscalls.rmtree(self.staging, ignore_errors=True)

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
        if err is None and self._image() != ([d["digest"] for d in plan.layers], plan.diff_ids):
            from .distribution import RegistryError
            err = RegistryError(f"pull of {plan.target}: the tag moved while it was copied; "
                                "retry")
        return done, err

    def _image(self) -> tuple | None:
        """(layer digests, diffIDs) of the image skopeo copied: it writes an OCI manifest
        and config, converting Docker ones, so their digests may differ from the plan's."""
        try:
            index = json.loads((self.layout / "index.json").read_text())
            manifest = json.loads(self._blob(index["manifests"][0]["digest"]))
            config = json.loads(self._blob(manifest["config"]["digest"]))
            return [d["digest"] for d in manifest["layers"]], config["rootfs"]["diff_ids"]
        except (OSError, ValueError, KeyError, IndexError, TypeError):
            return None

    def _blob(self, digest: str) -> bytes:
        return (self.bdir / digest.split(":", 1)[1]).read_bytes()
