"""The store's metadata: one SQLite database in WAL mode, with a schema version.

Writers take the database's write lock up front (``BEGIN IMMEDIATE``) and keep
every publish and removal step that must be atomic inside one transaction.
Readers never block writers (WAL). Tables:

* ``snapshots``  one row per snapshot (id, kind, strategy, state, times, sizes)
* ``parents``    ordered inputs of a snapshot; ``pin`` = the child needs the
  parent to stay (union merges, active and view snapshots)
* ``names``      aliases (``--name``) and the keys of active/view snapshots, with
  containerd's view of them: the parent *name* a snapshot was made over, and
  its created/updated times (schema 2)
* ``labels``     containerd labels, per name (schema 2)
* ``refs``       holders keeping a snapshot alive (``cli`` for CLI-made ones)
* ``leases``     mounts made from the store (live while the mount point is mounted)
* ``image_configs`` the OCI image config an imported or pulled image came
  with, per snapshot id and per name it was imported under (schema 3): what
  ``mergefs bundle`` runs
* ``layer_blobs`` a layer's compressed blob per compression (digest, diffID,
  size, media type): kept for push, and what a packed layer is unpacked from
  (schema 4; made on first use before)

A committed layer is **packed** when ``snapshots.packed`` names a blob (schema
4): its tree is not on disk yet and is unpacked from that blob on first use
(``snapshotter.packed``); NULL once the tree is there, and for everything else.

States: ``committed`` (visible), ``deleting`` (a prune has begun: invisible,
finished by the next writer or at open), ``corrupt`` (fsck --repair found its
content no longer matches its digest: kept for inspection, never reused).

The SQL is split by what it is about (callers use ``meta.X`` for any of them):
``db`` (schema, migrations, connections, transactions, errors), ``snapshots``
(rows, parents, refs, leases), ``names`` (names, labels, the holders record),
``images`` (layer blobs, image configs).
"""
from .db import (  # noqa: F401
    SCHEMA_VERSION, BUSY_TIMEOUT_S, SCHEMA, MIGRATIONS, connect, track_holders, untrack,
    REPAIR_HINT, translate, sqlite_errors, write)
from .snapshots import (  # noqa: F401
    State, SnapshotKind, Strategy, COLUMNS, Row, Parent, get, all_rows, insert, delete,
    parents, touch, add_ref, names_of, refs_of, drop_ref, ids_held_by, pinned_by, leased_at,
    mark_deleting, move_refs, drop_holder, holders_named, ids_with_refs,
    mark_deleting_if_unused, children_of, all_ids, ids_in_state, set_state,
    missing_pinned_parents, ids_by_prefix, farm_links, make_farm, add_lease, holders,
    names_by_id, first_name, count, set_unpacked, packed_rows)
from .names import (  # noqa: F401
    NameRow, NAME_COLUMNS, id_of_name, name_row, name_rows, add_name, drop_name,
    children_of_name, labels_of, set_labels, holders_of, restore_holders, unaccounted)
from .images import (  # noqa: F401
    BLOBS_SCHEMA, BLOB_COLUMNS, has_blobs, ensure_blobs, blobs_of, blob_row, put_blob, orphan_blobs,
    seed_blobs, image_present,
    forget_blobs_of, forget_blob, blob_digests, all_blobs, put_image_config, image_config,
    image_configs_of, restore_image_config)
