"""``Snapshotter``: containerd's verbs on the store (prepare, view, mounts, commit, ...)."""
from __future__ import annotations

import os
import sqlite3
import threading

import pytest

from mergefs.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from mergefs.mountspec import MountSpec, from_options
from mergefs.testing import mounts, tree
from snapshotter import Info, Kind, Snapshotter, Usage
from snapshotter.gc import prune
from ..conftest import needs

NS = "default/1/"         # containerd namespaces keys like this


@pytest.fixture
def sn(root):
    s = Snapshotter(root)
    yield s
    s.close()


def write_upper(spec: MountSpec, files: dict[str, bytes], mtime: int | None = None) -> None:
    """Write as a container would, straight into the upper (an overlay-format dir)."""
    for path, data in files.items():
        p = os.path.join(spec.upper, path)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "wb") as f:
            f.write(data)
    if mtime is not None:            # same bytes and times: same content (mtimes are content)
        for d, _, fs in os.walk(spec.upper, topdown=False):
            for n in fs:
                os.utime(os.path.join(d, n), (mtime, mtime))
            os.utime(d, (mtime, mtime))


def test_prepare_commit_prepare_chain(sn):
    m = sn.prepare(NS + "a", labels={"l": "1"})
    assert m.writable and m.lowers == () and os.path.isdir(m.upper) and os.path.isdir(m.work)
    assert sn.stat(NS + "a") == Info(NS + "a", None, Kind.ACTIVE, {"l": "1"},
                                     sn.stat(NS + "a").created, sn.stat(NS + "a").updated)
    write_upper(m, {"etc/base": b"base\n"})
    base = sn.commit(NS + "sha256:base", NS + "a", labels={"c": "2"})
    assert (base.kind, base.parent, base.labels) == (Kind.COMMITTED, None, {"c": "2"})
    with pytest.raises(NotFound):                 # commit removes the active snapshot
        sn.stat(NS + "a")
    m2 = sn.prepare(NS + "b", NS + "sha256:base")
    assert len(m2.lowers) == 1
    assert open(os.path.join(m2.lowers[0], "etc/base"), "rb").read() == b"base\n"
    write_upper(m2, {"etc/top": b"top\n"})
    top = sn.commit(NS + "top", NS + "b")
    assert top.parent == NS + "sha256:base"       # containerd names, not store ids
    view = sn.view(NS + "v", NS + "top")
    assert not view.writable and len(view.lowers) == 2
    assert sn.stat(NS + "v").kind == Kind.VIEW and sn.stat(NS + "v").parent == NS + "top"


def test_mounts_is_pure(sn, root):
    sn.prepare(NS + "a")
    before = sorted(os.listdir(root / "snapshots")), os.stat(root / "meta.db").st_mtime_ns
    wal = root / "meta.db-wal"
    wal_before = wal.stat().st_size if wal.exists() else 0
    for _ in range(3):
        sn.mounts(NS + "a")
    assert (sorted(os.listdir(root / "snapshots")), os.stat(root / "meta.db").st_mtime_ns) == before
    assert (wal.stat().st_size if wal.exists() else 0) == wal_before


def test_same_content_committed_twice_is_stored_once(sn):
    layers = []
    for key, name in (("k1", "n1"), ("k2", "n2")):
        write_upper(sn.prepare(NS + key), {"f": b"same"}, mtime=1_000_000)
        sn.commit(NS + name, NS + key)
        layers.append(sn.mounts(NS + name).lowers)
    assert layers[0] == layers[1]


def test_C2_used_key_commit_of_view_remove_of_parent(sn):
    sn.prepare(NS + "k")
    with pytest.raises(AlreadyExists):
        sn.prepare(NS + "k")
    with pytest.raises(AlreadyExists):
        sn.view(NS + "k")
    base = sn.commit(NS + "base", NS + "k")
    sn.view(NS + "v", base.name)
    with pytest.raises(FailedPrecondition):
        sn.commit(NS + "x", NS + "v")
    with pytest.raises(FailedPrecondition):
        sn.remove(NS + "base")                    # the view depends on it
    sn.remove(NS + "v")
    sn.remove(NS + "base")
    with pytest.raises(NotFound):
        sn.remove(NS + "base")
    assert list(sn.walk()) == []
    assert os.listdir(sn.root / "snapshots") == []    # nothing else held it: gone at once


def test_remove_keeps_content_another_name_uses(sn):
    for key, name in (("k1", "n1"), ("k2", "n2")):
        write_upper(sn.prepare(NS + key), {"f": b"same"}, mtime=1_000_000)
        sn.commit(NS + name, NS + key)
    sn.remove(NS + "n1")
    (lower,) = sn.mounts(NS + "n2").lowers
    assert open(os.path.join(lower, "f"), "rb").read() == b"same"
    assert prune(sn.store, all_named=True).deleted == []     # n2's ref holds it


def test_parent_must_exist_and_be_committed(sn):
    with pytest.raises(NotFound):
        sn.prepare(NS + "a", NS + "nope")
    sn.prepare(NS + "act")
    with pytest.raises(FailedPrecondition):
        sn.prepare(NS + "b", NS + "act")


@pytest.mark.parametrize("key", ["", "a\0b", "sha256:" + "a" * 64])
def test_bad_keys_are_refused(sn, key):
    with pytest.raises(InvalidArgument):
        sn.prepare(key)


def test_keys_are_opaque(sn):
    odd = "default/7/sha256:x y\n\t\u00e9/../:,"
    m = sn.prepare(odd)
    assert sn.mounts(odd) == m and sn.stat(odd).name == odd
    assert [i.name for i in sn.walk()] == [odd]


def test_update_labels_only(sn):
    sn.prepare(NS + "a", labels={"x": "1", "y": "2"})
    info = sn.stat(NS + "a")
    new = sn.update(Info(info.name, labels={"x": "9", "z": "3"}), ["labels.x", "labels.y"])
    assert new.labels == {"x": "9"}               # y absent from info: removed; z not asked
    assert new.updated >= info.updated
    assert sn.update(Info(info.name, labels={"q": "1"})).labels == {"q": "1"}
    assert sn.update(Info(info.name, labels={"r": "2"}), ["labels"]).labels == {"r": "2"}
    with pytest.raises(InvalidArgument):
        sn.update(Info(info.name, parent="other"), ["parent"])
    with pytest.raises(NotFound):
        sn.update(Info(NS + "nope"), ["labels"])


def test_walk_filters(sn):
    sn.prepare(NS + "a", labels={"containerd.io/gc.root": "x", "team": "web"})
    base = sn.commit(NS + "base", NS + "a", labels={"team": "db"})
    sn.prepare(NS + "b", base.name, labels={"team": "web"})
    sn.view(NS + "v", base.name)

    def names(*f):
        return sorted(i.name for i in sn.walk(*f))
    assert names() == [NS + "b", NS + "base", NS + "v"]
    assert names("kind==active") == [NS + "b"]
    assert names(f"parent=={NS}base,kind==view") == [NS + "v"]
    assert names("kind==view", "kind==active") == [NS + "b", NS + "v"]   # several: or
    assert names('labels.team==web') == [NS + "b"]
    assert names('labels."team"!=web') == [NS + "base", NS + "v"]
    assert names("labels.team") == [NS + "b", NS + "base"]
    assert names(f'name=="{NS}base"') == [NS + "base"]
    assert names("name~=/b") == [NS + "b", NS + "base"]
    with pytest.raises(InvalidArgument):
        list(sn.walk('labels."unterminated'))


def test_usage(sn):
    m = sn.prepare(NS + "a")
    empty = sn.usage(NS + "a")
    write_upper(m, {"big": b"x" * 100_000, "small": b"y"})
    u = sn.usage(NS + "a")
    assert isinstance(u, Usage) and u.inodes == empty.inodes + 2
    assert u.size >= empty.size + 100_000
    sn.commit(NS + "c", NS + "a")
    c = sn.usage(NS + "c")
    assert c.inodes == u.inodes and c.size >= 100_000


def test_threads_each_get_a_connection(sn):
    errors = []

    def work(n):
        try:
            for i in range(5):
                sn.prepare(f"{NS}t{n}-{i}")
                sn.stat(f"{NS}t{n}-{i}")
        except Exception as e:       # noqa: BLE001 - reported below
            errors.append(e)
    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(list(sn.walk("kind==active"))) == 20


def test_schema_1_store_is_migrated(root):
    Snapshotter(root).close()
    db = sqlite3.connect(root / "meta.db")          # make it look like a schema-1 store
    db.executescript("DROP TABLE labels; DROP TABLE image_configs; CREATE TABLE n2(name TEXT PRIMARY KEY, id TEXT NOT NULL);"
                     "DROP TABLE names; ALTER TABLE n2 RENAME TO names;"
                     "INSERT INTO names VALUES('old', 'sha256:" + "0" * 64 + "');"
                     "UPDATE meta SET value='1' WHERE key='schema_version';")
    db.close()
    with Snapshotter(root, reconcile=False) as sn:
        sn.store.db.execute("INSERT INTO labels VALUES('old', 'k', 'v')")   # the table exists
        sn.store.db.execute("SELECT * FROM image_configs")                # schema 3
        sn.store.db.execute("SELECT packed FROM snapshots")               # schema 4
        sn.store.db.execute("SELECT * FROM layer_blobs")
        version = sn.store.db.execute("SELECT value FROM meta WHERE key='schema_version'")
        assert version.fetchone()[0] == "4"


def test_schema_3_store_is_migrated_and_its_layers_stay_usable(root, layers, tmp_path):
    """Schema 4 adds ``snapshots.packed`` (packed layers) and makes ``layer_blobs`` part of
    the schema: a store made before keeps its layers, which are not packed."""
    with Snapshotter(root) as sn:
        lid = sn.import_dir(layers[0], name="base").id
    db = sqlite3.connect(root / "meta.db")          # as schema 3 left it (no blobs used yet)
    db.executescript("ALTER TABLE snapshots DROP COLUMN packed; DROP TABLE layer_blobs;"
                     "UPDATE meta SET value='3' WHERE key='schema_version';")
    db.close()
    with Snapshotter(root) as sn:
        row = sn.resolve("base")
        assert row.id == lid and row.packed is None
        assert sn.store.layer_tree(lid) == sn.store.fs_of(lid)
        sn.export("base", str(tmp_path / "out"))
        assert sn.store.db.execute("SELECT value FROM meta WHERE key='schema_version'"
                                   ).fetchone()[0] == "4"


@needs("overlay")
def test_mounts_through_kernel_overlay_then_commit(sn):
    base_m = sn.prepare(NS + "a")
    write_upper(base_m, {"etc/passwd": b"root\n", "etc/group": b"g\n"})
    sn.commit(NS + "base", NS + "a")
    m = sn.prepare(NS + "b", NS + "base")
    opts = m.to_options()
    assert from_options(opts) == m
    with mounts.overlay_mount(list(m.lowers), upper=m.upper, work=m.work) as mnt:
        os.unlink(os.path.join(mnt, "etc/group"))
        with open(os.path.join(mnt, "etc/new"), "w") as f:
            f.write("new\n")
        expected = tree.capture(mnt)
    sn.commit(NS + "top", NS + "b")
    with mounts.overlay_mount(list(sn.view(NS + "v", NS + "top").lowers)) as mnt:
        tree.assert_same(tree.capture(mnt), expected, "committed snapshot")


def test_mountspec_options_round_trip():
    spec = MountSpec(("/b", "/m", "/t"), "/u", "/w", True, ("nodev",))
    assert spec.to_options() == ["lowerdir=/t:/m:/b", "upperdir=/u", "workdir=/w",
                                 "allow_other", "nodev"]
    assert from_options(",".join(spec.to_options())) == spec
    with pytest.raises(InvalidArgument):
        from_options("upperdir=/u,workdir=/w")
    with pytest.raises(InvalidArgument):
        from_options("lowerdir=/a,upperdir=/u")
    with pytest.raises(InvalidArgument):
        MountSpec(("/a:b",)).to_options()


def test_public_api():
    import snapshotter
    assert sorted(snapshotter.__all__) == ["Capabilities", "Decision", "Info", "Kind",
                                           "MergeSpec", "Snapshotter", "Store", "Usage",
                                           "choose_strategy", "default_root"]
    verbs = ("prepare view mounts commit remove stat update walk usage cleanup close merge diff "
             "import_ export release prune du fsck").split()
    assert all(callable(getattr(Snapshotter, v)) for v in verbs)
    assert [int(k) for k in (Kind.VIEW, Kind.ACTIVE, Kind.COMMITTED)] == [1, 2, 3]
