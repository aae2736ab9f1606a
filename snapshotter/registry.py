"""Push and pull through an OCI registry, by digest (``mergefs push`` / ``mergefs pull``).

Push (``snapshotter.registry_push``): REF's flattened layers become layer
blobs (compressed once, remembered per layer), an image config with their
diffIDs and a manifest carrying the annotations below, copied by skopeo.

Identity across machines: each layer descriptor carries two annotations, the
layer's snapshot id (``org.mergefs.layer.id``) and its tree digest
(``org.mergefs.layer.tree``, mergefs-tree-v1). A merge id is a digest of its
layer ids only, so a merge of pulled layers has the id the same merge has on
the pushing machine as soon as the layers have the pusher's ids.

Pull: the manifest and config (``skopeo inspect``) say which layers there
are; a layer is present if the store has its annotated id (same tree digest),
its diffID as an id, or a remembered blob with that diffID. When every layer
of the store has its blob (an empty store, one that only pulled), one
``skopeo copy`` of the whole image, started before the plan is known into a
layout seeded with those blobs (``snapshotter.pullcopy``), fetches the
missing layers, kept only if the plan says it fetches exactly them.
Otherwise each missing layer is fetched by its own ``skopeo copy`` into a
fresh OCI layout where the other layers' blobs are sparse placeholders
(skopeo reuses a blob that exists at the destination, so it downloads
exactly one layer blob), 4 downloads in flight. skopeo checks the blob
digest as it downloads.

* Lazy (the default): the blob is kept as a **packed layer**
  (``snapshotter.packed``): moved into the blob area and published under the
  annotated id with the annotated tree digest recorded (``_claim``; the
  diffID when there is no annotation, when the store has that id with another
  tree, or when not root), no tree on disk. The first use of the tree
  (``Store.layer_tree``) unpacks it and checks digest, size, diffID and tree
  digest then; a mismatch marks the layer corrupt. The claim is checked, not
  trusted, only later.
* ``unpack=True`` (``--unpack``): each blob is extracted as it arrives
  (digest, size and diffID checked while streaming), its tree digest
  computed, and the layer stored under the annotated id only if that tree
  digest is the annotated one, otherwise under the diffID, like ``import``.

Each layer is published as soon as it is stored, so an interrupted pull
resumes without fetching finished layers again. The image record is the
union merge of the layers (metadata only: no tree needed), named ``--name``
or ``REPO:TAG``'s last path part (like ``import`` of an image).
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import threading
from pathlib import Path
from typing import Callable, NamedTuple

from mergefs.platforms import oci_architecture

from . import meta, service
from .blobs import blob_dir, drop_orphans
from .digest import TreeSummary, merge_id, tree_digest
from .distribution import RegistryError, Skopeo, Target, parse_target, result, stop
from .meta import Row
from .store import CLI_HOLDER, Store

ANN_ID = "org.mergefs.layer.id"
ANN_TREE = "org.mergefs.layer.tree"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
CONFIG_TYPE = "application/vnd.oci.image.config.v1+json"
_ID = "sha256:"

Progress = Callable[[str], None]


def _quiet(_msg: str) -> None:
    pass


class Blob(NamedTuple):           # a layer_blobs row (meta.BLOB_COLUMNS)
    layer: str
    compression: str
    digest: str
    diff_id: str
    size: int
    media_type: str


class PullResult(NamedTuple):
    target: str
    manifest_digest: str
    layers: list[Row]
    fetched: list[str]         # blob digests downloaded by this pull
    image: Row | None
    packed: list[str]          # layer ids still packed


def _hex(digest: str) -> str:
    return digest.split(":", 1)[1]


def _compression_of(media_type: str) -> str:
    if media_type.endswith("gzip"):
        return "gzip"
    if media_type.endswith("zstd"):
        return "zstd"
    return "none"


def _json(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


# -- pull -------------------------------------------------------------------------------------
class _Plan(NamedTuple):
    target: Target              # pinned to the manifest digest
    manifest_digest: str
    manifest: dict
    layers: list[dict]          # descriptors, bottom first
    diff_ids: list[str]
    config: dict | None = None  # the image config (kept for ``mergefs bundle``)


def _platform(index: dict) -> str:
    arch = oci_architecture()
    for m in index.get("manifests", []):
        p = m.get("platform", {})
        if p.get("os") == "linux" and p.get("architecture") == arch:
            return m["digest"]
    raise RegistryError(f"the image index has no manifest for linux/{arch}")


def _plan(client: Skopeo, target: Target, inspected=None) -> _Plan:
    """Manifest and config, fetched side by side (``inspected``: the two ``skopeo inspect``
    processes, already started); the config checked against the manifest."""
    mproc, cproc = inspected or (client.inspect(target), client.inspect(target, config=True))
    raw = result(mproc, f"pull of {target} failed")
    cfg_raw = result(cproc, f"pull of {target} failed")
    manifest = json.loads(raw)
    mtype = manifest.get("mediaType")
    if mtype in (OCI_INDEX, DOCKER_LIST) or "manifests" in manifest:
        target = target.pinned(_platform(manifest))
        raw = result(client.inspect(target), f"pull of {target} failed")
        manifest = json.loads(raw)
        mtype = manifest.get("mediaType")
    if mtype not in (OCI_MANIFEST, DOCKER_MANIFEST, None) or manifest.get("schemaVersion") != 2:
        raise RegistryError(f"pull of {target}: unsupported manifest type {mtype!r}")
    digest = "sha256:" + hashlib.sha256(raw).hexdigest()
    if target.digest and target.digest != digest:
        raise RegistryError(f"pull of {target}: manifest digest mismatch (got {digest})")
    want = manifest["config"]["digest"]
    if "sha256:" + hashlib.sha256(cfg_raw).hexdigest() != want:
        raise RegistryError(f"pull of {target}: the tag moved or the config does not match "
                            f"its digest {want}; retry")
    diff_ids = json.loads(cfg_raw).get("rootfs", {}).get("diff_ids", [])
    if len(diff_ids) != len(manifest.get("layers", [])):
        raise RegistryError(f"pull of {target}: config has {len(diff_ids)} diffIDs for "
                            f"{len(manifest.get('layers', []))} layers")
    return _Plan(target.pinned(digest), digest, manifest, manifest["layers"], diff_ids,
                 json.loads(cfg_raw))


def _present(store: Store, desc: dict, diff_id: str, holder: str | None) -> Row | None:
    """The stored layer this descriptor stands for, with a ref taken, or None."""
    ann = desc.get("annotations") or {}
    lid, tree = ann.get(ANN_ID), ann.get(ANN_TREE)
    if lid and tree:
        row = store.get(lid)
        if row is not None and row.tree_digest == tree:
            if (got := store.reuse(lid, holder)) is not None:
                return got
    if (got := store.reuse(diff_id, holder)) is not None:
        return got
    for brow in meta.blobs_of(store.db, diff_id=diff_id):
        if (got := store.reuse(brow[0], holder)) is not None:
            return got
    return None


class _Fetch:
    """One layer blob downloaded by skopeo into its own fresh OCI layout."""

    def __init__(self, store: Store, client: Skopeo, plan: _Plan, index: int):
        self.desc = plan.layers[index]
        self.staged = store.stage("pull")
        self.layout = self.staged.path / "oci"
        bdir = self.layout / "blobs" / "sha256"
        os.makedirs(bdir)
        for j, d in enumerate(plan.layers):
            if j != index and d["digest"] != self.desc["digest"]:
                with open(bdir / _hex(d["digest"]), "wb") as f:   # sparse placeholder
                    f.truncate(d["size"])
        (self.layout / "oci-layout").write_bytes(_json({"imageLayoutVersion": "1.0.0"}))
        (self.layout / "index.json").write_bytes(_json({"schemaVersion": 2, "manifests": []}))
        self.proc = client.copy(plan.target.docker(), f"oci:{self.layout}:pull", plan.target,
                                push=False)
        self.what = f"pull of {plan.target} failed (layer {self.desc['digest'][:19]})"

    def wait(self) -> Path:
        """The layout once skopeo is done; if it failed (or refused the blob), its
        staging goes too."""
        try:
            result(self.proc, self.what)
        except BaseException:
            self.cancel()
            raise
        return self.layout

    def cancel(self) -> None:
        stop(self.proc)
        self.staged.discard()


def _is_digest(text) -> bool:
    return isinstance(text, str) and text.startswith(_ID) and len(text) == 71 and \
        all(c in "0123456789abcdef" for c in text[7:])


def _claim(store: Store, desc: dict, diff_id: str) -> tuple[str, str | None]:
    """(id, tree digest to verify at unpack) for a layer kept packed.

    The pusher's annotated id and tree digest are taken (so merges get the ids
    they have on the pushing machine) unless the store has that id with another
    tree, or we are not root (an unpack without root cannot give files their
    owners, so the tree could never match): then the diffID, as ``import``."""
    ann = desc.get("annotations") or {}
    claimed, tree = ann.get(ANN_ID), ann.get(ANN_TREE)
    if not (_is_digest(claimed) and _is_digest(tree)) or os.geteuid() != 0:
        return diff_id, None
    have = store.get(claimed)
    if have is not None and have.state == "committed" and have.tree_digest not in (None, tree):
        return diff_id, None
    return claimed, tree


def _keep(store: Store, fetch: _Fetch, diff_id: str, source: str, holder) -> tuple[Row, Blob]:
    """Keep the fetched blob (skopeo checked its digest) as a packed layer, unpacked on
    first use (``snapshotter.packed``: digest, size, diffID and tree digest checked then)."""
    layout = fetch.wait()
    try:
        return _keep_blob(store, fetch.desc, diff_id, layout / "blobs" / "sha256" /
                          _hex(fetch.desc["digest"]), source, holder)
    finally:
        fetch.cancel()


def _keep_blob(store: Store, desc: dict, diff_id: str, path: Path, source: str, holder,
               link: bool = False) -> tuple[Row, Blob]:
    """Publish the downloaded blob at ``path`` as the packed layer ``desc`` stands for."""
    from . import packed
    size = os.stat(path).st_size
    if size != desc["size"]:
        raise RegistryError(f"pull of {source}: the blob {desc['digest'][:19]} has {size} "
                            f"bytes, the manifest says {desc['size']}")
    lid, tree = _claim(store, desc, diff_id)
    comp = _compression_of(desc["mediaType"])
    blob = Blob(lid, comp, desc["digest"], diff_id, size, _MEDIA.get(comp, _MEDIA["none"]))
    row = packed.publish(store, path, tuple(blob), lid, tree,
                         f"pull of {source}", source, holder, link=link)
    return row, Blob(row.id, *tuple(blob)[1:])


def _one_copy(store: Store, spec, plan: _Plan, missing: list[int], rows: list, holder,
              progress: Progress, source: str) -> list[str]:
    """The missing layers from one ``skopeo copy`` (``snapshotter.pullcopy``), each
    published as it lands; their blob digests."""
    n, stored = len(plan.layers), [0]

    def keep(i: int, path: Path) -> str:
        rows[i], blob = _keep_blob(store, plan.layers[i], plan.diff_ids[i], path, source,
                                   holder, link=True)
        stored[0] += 1
        progress(f"layer {i + 1}/{n} {blob.digest[:19]} {blob.size} bytes: fetched, "
                 f"verified, stored packed as {service.short(rows[i].id)}")
        _pause_point(f"pull:after-layer-{stored[0]}")
        return blob.digest
    return spec.fetch(plan, missing, keep)


_MEDIA = {"gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
          "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
          "none": "application/vnd.oci.image.layer.v1.tar"}


def _import(store: Store, fetch: _Fetch, diff_id: str, source: str, holder) -> tuple[Row, Blob]:
    """``--unpack``: extract the fetched blob (digest, size and diffID checked while
    streaming) and publish the tree; the id is the annotated one only when the tree
    digest is the annotated one, else the diffID."""
    from mergefs import oci
    layout = fetch.wait()
    desc = fetch.desc
    staged = store.stage("pull")
    try:
        with oci.open_image(str(layout), ref="pull") as img:
            (ld,) = [d for d in img.layers if d.digest == desc["digest"]][:1] or [None]
            if ld is None:
                raise RegistryError(f"{fetch.what}: blob missing from skopeo's copy")
            with img.open_layer(ld) as reader:
                oci.extract_layer(reader, staged.path / "fs", expected_diff_id=diff_id)
        tree = tree_digest(staged.path / "fs")
        ann = desc.get("annotations") or {}
        claimed = ann.get(ANN_ID, "")
        lid = claimed if (ann.get(ANN_TREE) == tree.digest and claimed.startswith(_ID)
                          and len(claimed) == 71) else diff_id
        row = service.publish_layer(store, staged, TreeSummary(lid, tree.entries, tree.bytes),
                                    tree.digest, "layer", f"pull of {source}", source, None,
                                    holder, "pull")
        comp = _compression_of(desc["mediaType"])
        blob = Blob(row.id, comp, desc["digest"], diff_id, desc["size"], _MEDIA[comp])
        os.replace(layout / "blobs" / "sha256" / _hex(blob.digest),
                   blob_dir(store) / _hex(blob.digest))
        with meta.write(store.db):
            meta.put_blob(store.db, tuple(blob))
        return row, blob
    finally:
        staged.discard()
        fetch.cancel()


def _pause_point(step: str) -> None:
    """Tests: ``MERGEFS_TEST_PAUSE_AT=STEP`` stops the process here (SIGSTOP) until SIGCONT.

    Steps: ``pull:after-layer-K``, once the K-th fetched layer is stored."""
    if os.environ.get("MERGEFS_TEST_PAUSE_AT") == step:
        os.kill(os.getpid(), signal.SIGSTOP)


def pull_jobs(missing: int, unpack: bool = False) -> int:
    """Layers handled at once: ``MERGEFS_PULL_JOBS``, else 4 for a lazy pull, 1 with
    ``unpack``.

    Lazy: a job downloads one layer and keeps its blob (no CPU to speak of), so
    jobs are downloads in flight, each started as soon as one ends (skopeo's
    own copy runs up to 6). ``unpack``: a job extracts one layer while the next
    one downloads; layers of a pull are extracted without lowers, so they are
    independent until each is published and may be extracted side by side, at
    most one per core. Measured on 2 shared cores (tools/bench_registry.py,
    load 8), two at once was slower (median 56.5 s against 49.3 s for 100k
    files), so one is the default there."""
    default = 1 if unpack else 4
    try:
        jobs = int(os.environ.get("MERGEFS_PULL_JOBS", str(default)))
    except ValueError:
        jobs = default
    if unpack:
        from mergefs.oci._compress import cores
        jobs = min(jobs, cores())
    return max(1, min(jobs, missing or 1))


def _fetch_all(store: Store, client: Skopeo, plan: _Plan, missing: list[int],
               rows: list, holder, progress: Progress, source: str,
               unpack: bool = False) -> list[str]:
    """Fetch and store the ``missing`` layers (indexes into the plan); their blob digests.

    ``pull_jobs`` workers take the layers in order; each starts its layer's
    download, and with ``unpack`` the next layer's too, so a download runs
    while layers are extracted.
    The first error stops the others (their downloads are killed, their
    staging discarded); layers already published stay (a retry resumes)."""
    lock = threading.Lock()
    fetches: dict[int, _Fetch] = {}
    done: dict[int, str] = {}
    errors: list[BaseException] = []
    state = {"next": 0, "stored": 0}
    n = len(plan.layers)

    def start(k: int) -> None:                  # under the lock
        if k < len(missing) and k not in fetches:
            fetches[k] = _Fetch(store, client, plan, missing[k])

    def worker() -> None:
        while True:
            with lock:
                if errors or state["next"] >= len(missing):
                    return
                k = state["next"]
                state["next"] += 1
                try:
                    for j in range(ahead + 1):   # downloads run while this one is stored
                        start(k + j)
                except BaseException as e:
                    errors.append(e)
                    return
                current = fetches.pop(k)
            i = missing[k]
            try:
                rows[i], blob = (_import if unpack else _keep)(store, current, plan.diff_ids[i],
                                                               source, holder)
            except BaseException as e:
                with lock:
                    errors.append(e)
                return
            with lock:
                done[k] = blob.digest
                state["stored"] += 1
                how = "packed" if rows[i].packed else "unpacked"
                progress(f"layer {i + 1}/{n} {blob.digest[:19]} {blob.size} bytes: fetched, "
                         f"verified, stored {how} as {service.short(rows[i].id)}")
                _pause_point(f"pull:after-layer-{state['stored']}")

    jobs = pull_jobs(len(missing), unpack)
    ahead = 1 if unpack else 0
    threads = [threading.Thread(target=worker, name=f"mergefs-pull-{j}", daemon=True)
               for j in range(jobs - 1)]
    try:
        for t in threads:
            t.start()
        worker()
        for t in threads:
            t.join()
    finally:
        with lock:
            errors.append(StopIteration())   # no worker takes another layer
            left = list(fetches.values())
            fetches.clear()
        for f in left:
            f.cancel()
    real = [e for e in errors if not isinstance(e, StopIteration)]
    if real:
        raise real[0]
    return [done[k] for k in sorted(done)]


def pull(store: Store, target: str | Target, name: str | None = None,
         client: Skopeo | None = None, holder: str | None = CLI_HOLDER,
         progress: Progress = _quiet, unpack: bool = False, inspected=None,
         copy=None) -> PullResult:
    """Fetch the layers of ``target`` the store lacks, keep them packed (``unpack``:
    extract and verify each now), record the image.

    ``inspected``: the manifest's and config's ``skopeo inspect``, already started;
    ``copy``: the whole image's copy (``pullcopy.start``), already started; this call
    ends both. Without them, they are started here."""
    target = parse_target(target) if isinstance(target, str) else target
    client = client or Skopeo()
    from . import pullcopy
    name = name or target.default_name()
    spec = copy if copy is not None else pullcopy.start(store.root, client, target, unpack,
                                                        name)
    try:
        drop_orphans(store)
        plan = _plan(client, target, inspected)
        n = len(plan.layers)
        rows: list[Row | None] = [_present(store, d, i, holder)
                                  for d, i in zip(plan.layers, plan.diff_ids)]
        missing = [i for i, r in enumerate(rows) if r is None]
        progress(f"{target}: {n} layers, {n - len(missing)} present, {len(missing)} to fetch")
        if missing and not unpack:        # a name taken by another image: fail before fetching
            ids = [r.id if r is not None else _claim(store, d, i)[0]
                   for r, d, i in zip(rows, plan.layers, plan.diff_ids)]
            store.check_name(name, merge_id(ids) if len(ids) > 1 else ids[0])
        if spec is None and missing:      # none started before the plan: the image's now
            spec = pullcopy.start(store.root, client, plan.target, unpack)
        if spec is not None and missing and spec.covers(plan, missing):
            fetched = _one_copy(store, spec, plan, missing, rows, holder, progress, str(target))
        else:
            if spec is not None:
                spec.cancel()
            fetched = _fetch_all(store, client, plan, missing, rows, holder, progress,
                                 str(target), unpack)
    finally:
        if spec is not None:
            spec.cancel()
    if unpack:                         # layers present but packed: unpacked now too
        from . import packed
        packed.unpack_all(store, [r.id for r in rows if r is not None])
    layers = [r for r in rows if r is not None]
    image = None
    if len(layers) > 1:
        image = service.merge(store, [r.id for r in layers], strategy="union", name=name,
                              holder=holder).row
    elif layers:
        image = store.reuse(layers[0].id, holder, name)
    if image is not None:
        service.record_image_config(store, image.id, plan.config, name)
    packed = [r.id for r in layers if (cur := store.get(r.id)) is not None and cur.packed]
    return PullResult(str(target), plan.manifest_digest, layers, fetched, image, packed)


_PUSH = ("push", "PushResult", "ensure_blob", "COMPRESSIONS")


def __getattr__(name: str):
    """The push side (``snapshotter.registry_push``), loaded on first use: a pull does
    not need it."""
    if name in _PUSH:
        from . import registry_push
        return getattr(registry_push, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["push", "pull", "PushResult", "PullResult", "Skopeo", "RegistryError", "parse_target"]
