"""The named checks of docs/semantics.md, runnable against any implementation of Merge.

An implementation is a callable ``merge(specs: list[LayerSpec]) -> View``
(bottom first). Each ``check_*`` builds its layers declaratively, merges them
and asserts what the rule says. ``CHECKS`` lists them all; the model, the farm,
kernel overlayfs and the union mount run the same list.
"""
from __future__ import annotations

from typing import Callable

from .builders import DEFAULT_MTIME_NS, LayerSpec
from .tree import View

Merge = Callable[[list], View]
CHECKS: list[Callable[[Merge], None]] = []


def check(fn):
    CHECKS.append(fn)
    return fn


def kinds(view: View) -> dict[bytes, str]:
    return {p: a.kind for p, a in view.entries.items()}


@check
def check_M1_later_wins_dirs_merge(merge: Merge) -> None:
    v = merge([LayerSpec().file("a", b"old").dir("d", mode=0o700, uid=1).file("d/x", b"x"),
               LayerSpec().file("a", b"new", mode=0o600).dir("d", mode=0o751, uid=2,
                                                            mtime_ns=DEFAULT_MTIME_NS + 7)
               .file("d/y", b"y")])
    assert v.entries[b"a"].size == 3 and v.entries[b"a"].mode & 0o777 == 0o600
    assert {b"d/x", b"d/y"} <= v.entries.keys()
    d = v.entries[b"d"]
    assert (d.mode & 0o777, d.uid, d.mtime_ns) == (0o751, 2, DEFAULT_MTIME_NS + 7)


@check
def check_M2_file_replaces_subtree(merge: Merge) -> None:
    v = merge([LayerSpec().file("d/x").file("d/sub/y"), LayerSpec().file("d", b"file")])
    assert kinds(v)[b"d"] == "file"
    assert not any(p.startswith(b"d/") for p in v.entries)


@check
def check_M3_dir_over_file_starts_fresh(merge: Merge) -> None:
    v = merge([LayerSpec().file("d", b"file"), LayerSpec().file("d/new")])
    assert kinds(v)[b"d"] == "dir" and b"d/new" in v.entries


@check
def check_M3_dir_over_file_over_dir(merge: Merge) -> None:
    v = merge([LayerSpec().file("d/old"), LayerSpec().file("d"), LayerSpec().file("d/new")])
    assert b"d/new" in v.entries and b"d/old" not in v.entries


@check
def check_M4_one_input_is_itself(merge: Merge) -> None:
    layer = LayerSpec().file("a", b"1").symlink("l", "a").dir("e")
    v = merge([layer])
    assert set(v.entries) == {b"", b"a", b"l", b"e"}


@check
def check_M4_empty_merge_is_empty(merge: Merge) -> None:
    v = merge([LayerSpec(), LayerSpec()])
    assert set(v.entries) == {b""}


@check
def check_M5_deletion_applies_to_all_earlier(merge: Merge) -> None:
    v = merge([LayerSpec().file("a/x"), LayerSpec().file("a/y"), LayerSpec().whiteout("a")])
    assert b"a" not in v.entries and b"a/x" not in v.entries


@check
def check_D1_whiteout_removes_subtree_and_is_invisible(merge: Merge) -> None:
    v = merge([LayerSpec().file("d/x").file("d/s/t").file("keep"),
               LayerSpec().whiteout("d").whiteout("nothing-below")])
    assert set(v.entries) == {b"", b"keep"}


@check
def check_D2_whiteout_does_not_hide_same_layer(merge: Merge) -> None:
    v = merge([LayerSpec().file("f", b"lower"), LayerSpec().whiteout("f").file("f", b"upper")])
    assert v.entries[b"f"].size == 5


@check
def check_D3_opaque_hides_lower_children_keeps_own(merge: Merge) -> None:
    v = merge([LayerSpec().file("d/lower").file("d/both", b"l"),
               LayerSpec().opaque_dir("d", mode=0o711).file("d/mine").file("d/both", b"up")])
    assert {p for p in v.entries if p.startswith(b"d/")} == {b"d/mine", b"d/both"}
    assert v.entries[b"d/both"].size == 2 and v.entries[b"d"].mode & 0o777 == 0o711


@check
def check_D3_opaque_only_hides_lower(merge: Merge) -> None:
    v = merge([LayerSpec().file("d/a"), LayerSpec().opaque_dir("d").file("d/b"),
               LayerSpec().file("d/c")])
    assert {p for p in v.entries if p.startswith(b"d/")} == {b"d/b", b"d/c"}


@check
def check_D5_whiteout_of_missing_path_creates_parents(merge: Merge) -> None:
    v = merge([LayerSpec().file("x"), LayerSpec().whiteout("p/q/gone")])
    assert kinds(v)[b"p/q"] == "dir" and b"p/q/gone" not in v.entries


@check
def check_D7_deleted_and_recreated_dir_is_opaque(merge: Merge) -> None:
    v = merge([LayerSpec().file("d/old"), LayerSpec().whiteout("d").file("d/new")])
    assert {p for p in v.entries if p.startswith(b"d/")} == {b"d/new"}


@check
def check_S1_dir_replaces_symlink_and_back(merge: Merge) -> None:
    v = merge([LayerSpec().symlink("a", "/etc").dir("b").file("b/x"),
               LayerSpec().file("a/y").symlink("b", "a")])
    assert kinds(v)[b"a"] == "dir" and b"a/y" in v.entries
    assert kinds(v)[b"b"] == "symlink" and v.entries[b"b"].target == b"a"
    assert b"b/x" not in v.entries


@check
def check_S1_delete_through_symlink_deletes_nothing(merge: Merge) -> None:
    v = merge([LayerSpec().dir("bar").file("bar/x").symlink("foo", "bar"),
               LayerSpec().whiteout("foo/x")])
    assert b"bar/x" in v.entries
    assert kinds(v)[b"foo"] == "dir"     # D5: the whiteout's parent is a real dir in its layer


@check
def check_S1_circular_links_are_inert(merge: Merge) -> None:
    v = merge([LayerSpec().symlink("a", "b").symlink("b", "a").symlink("self", "self")])
    assert v.entries[b"a"].target == b"b" and v.entries[b"self"].target == b"self"


@check
def check_S2_absolute_and_dotdot_links_kept_verbatim(merge: Merge) -> None:
    v = merge([LayerSpec().symlink("etc", "/etc").symlink("up", "../../../../")])
    assert v.entries[b"etc"].target == b"/etc" and v.entries[b"up"].target == b"../../../../"
    assert set(v.entries) == {b"", b"etc", b"up"}


@check
def check_H1_hardlinks_stay_one_inode(merge: Merge) -> None:
    v = merge([LayerSpec().file("a", b"shared").hardlink("b", "a").file("c/d", b"x")
               .hardlink("c/e", "c/d")])
    assert frozenset({b"a", b"b"}) in v.groups and frozenset({b"c/d", b"c/e"}) in v.groups


@check
def check_H2_overwriting_one_name_keeps_other(merge: Merge) -> None:
    v = merge([LayerSpec().file("a", b"old").hardlink("b", "a"), LayerSpec().file("a", b"newer")])
    assert v.entries[b"b"].size == 3 and v.entries[b"a"].size == 5
    assert not v.groups


@check
def check_H3_deleting_one_name_keeps_other(merge: Merge) -> None:
    v = merge([LayerSpec().file("a", b"data").hardlink("b", "a"), LayerSpec().whiteout("a")])
    assert b"a" not in v.entries and v.entries[b"b"].size == 4


@check
def check_A1_ownership_and_setuid_survive(merge: Merge) -> None:
    v = merge([LayerSpec().file("bin/su", b"x", mode=0o4755, uid=0, gid=0)
               .file("home/u", b"y", mode=0o640, uid=1000, gid=1000)
               .file("cap", b"z", mode=0o755, xattrs={"security.capability":
                     bytes.fromhex("0100000200200000000000000000000000000000")})])
    assert v.entries[b"bin/su"].mode & 0o7777 == 0o4755
    assert (v.entries[b"home/u"].uid, v.entries[b"home/u"].gid) == (1000, 1000)
    assert dict(v.entries[b"cap"].xattrs).get("security.capability")


@check
def check_A2_nanosecond_mtimes(merge: Merge) -> None:
    v = merge([LayerSpec().dir("d", mtime_ns=1_234_567_890_987_654_321)
               .file("d/f", mtime_ns=1_111_111_111_222_222_222)
               .symlink("d/l", "f", mtime_ns=1_333_333_333_444_444_444)])
    assert v.entries[b"d"].mtime_ns == 1_234_567_890_987_654_321
    assert v.entries[b"d/f"].mtime_ns == 1_111_111_111_222_222_222
    assert v.entries[b"d/l"].mtime_ns == 1_333_333_333_444_444_444


@check
def check_A3_user_xattrs_are_content(merge: Merge) -> None:
    v = merge([LayerSpec().file("f", xattrs={"user.a": b"1"}).dir("d", xattrs={"user.b": b"2"}),
               LayerSpec().dir("d", xattrs={"user.c": b"3"})])
    assert dict(v.entries[b"f"].xattrs) == {"user.a": b"1"}
    assert dict(v.entries[b"d"].xattrs) == {"user.c": b"3"}


@check
def check_A4_special_files(merge: Merge) -> None:
    v = merge([LayerSpec().fifo("p").char("null", 1, 3).socket("s")])
    assert kinds(v)[b"p"] == "fifo" and kinds(v)[b"s"] == "socket"
    assert kinds(v)[b"null"] == "char" and v.entries[b"null"].rdev != 0


@check
def check_names_are_bytes(merge: Merge) -> None:
    v = merge([LayerSpec().file(b"caf\xe9").file(b"new\nline", b"x"), LayerSpec().whiteout(b"caf\xe9")])
    assert b"new\nline" in v.entries and b"caf\xe9" not in v.entries


@check
def check_root_takes_top_layer_attrs(merge: Merge) -> None:
    bottom, top = LayerSpec(), LayerSpec()
    bottom.dir("", mode=0o700, mtime_ns=5)
    top.dir("", mode=0o751, uid=3, mtime_ns=DEFAULT_MTIME_NS + 1)
    v = merge([bottom, top])
    assert (v.entries[b""].mode & 0o777, v.entries[b""].uid) == (0o751, 3)
