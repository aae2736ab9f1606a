"""A copy-up moves the read-only handles of its file onto the copy (U4a, real
opens: ``UnionOperations._reopen_readers``) without walking every open handle
of the mount: the handles are indexed by inode (``_held``), and the index
follows open, release and releasedir (``check``).

Counted, not timed: the Python lines ops.py runs for one copy-up (the open
for writing that makes it) with one other open file and with 400 others.
"""
from __future__ import annotations

import os
import sys

from mergefs.testing.builders import LayerSpec, materialise_stack

OLD, NEW = b"old bytes of the lower file\n" * 10, b"appended\n"


def _ops_file() -> str:
    from mergefs.union import ops
    return ops.__file__


async def _copy_up_cost(tmp_path, make_driver, others: int) -> tuple[int, bytes]:
    """Open ``others`` read-only handles of d/g and one of d/f, then open d/f for
    appending (its copy-up): the lines of ops.py that ran for it, and what the
    reader's handle reads after the append."""
    layers = materialise_stack([LayerSpec().file("d/f", OLD).file("d/g", OLD)],
                               tmp_path / f"layers{others}", "overlay")
    up, wk = tmp_path / f"up{others}", tmp_path / f"wk{others}"
    up.mkdir()
    wk.mkdir()
    drv = make_driver(layers, upper=up, work=wk)
    ops = drv.ops
    g = await drv.lookup("d/g")
    held = [(await ops.open(g, os.O_RDONLY, drv.ctx)).fh for _ in range(others)]
    f = await drv.lookup("d/f")
    reader = (await ops.open(f, os.O_RDONLY, drv.ctx)).fh
    dirfh = await ops.opendir(await drv.lookup("d"), drv.ctx)
    assert ops.check() == []
    lines, path = [0], _ops_file()

    def tracer(frame, event, arg):
        if frame.f_code.co_filename != path:
            return None
        if event == "line":
            lines[0] += 1
        return tracer

    sys.settrace(tracer)
    try:
        writer = (await ops.open(f, os.O_WRONLY | os.O_APPEND, drv.ctx)).fh
    finally:
        sys.settrace(None)
    assert await ops.write(writer, len(OLD), NEW) == len(NEW)
    seen = await ops.read(reader, 0, 1 << 20)
    assert ops.check() == []
    for fh in held + [reader, writer]:
        await ops.release(fh)
    await ops.releasedir(dirfh)
    assert ops.check() == [] and ops.handles == {}
    await drv.finish()
    return lines[0], seen


async def test_U4a_a_copy_up_costs_the_same_whatever_else_is_open(tmp_path, make_driver):
    few, seen_few = await _copy_up_cost(tmp_path, make_driver, 1)
    many, seen_many = await _copy_up_cost(tmp_path, make_driver, 400)
    assert seen_few == seen_many == OLD + NEW          # the reader moved to the copy
    assert many == few, (few, many)


async def test_the_handles_by_inode_follow_release(tmp_path, make_driver):
    """Handles opened and released in any order, on files and directories, leave
    the index equal to the handle table (``check``) and empty at the end."""
    layers = materialise_stack([LayerSpec().file("d/f", OLD).file("d/g", OLD)],
                               tmp_path / "layers", "overlay")
    (tmp_path / "up").mkdir()
    (tmp_path / "wk").mkdir()
    drv = make_driver(layers, upper=tmp_path / "up", work=tmp_path / "wk")
    ops = drv.ops
    f, g, d = await drv.lookup("d/f"), await drv.lookup("d/g"), await drv.lookup("d")
    fhs = []
    for i in range(12):
        ino = (f, g)[i % 2]
        fhs.append((await ops.open(ino, os.O_RDWR if i % 3 == 0 else os.O_RDONLY,
                                   drv.ctx)).fh)
        if i % 4 == 0:
            fhs.append(-(await ops.opendir(d, drv.ctx)))
    assert ops.check() == []
    assert set(ops._held) == {ops.inodes.get(f), ops.inodes.get(g), ops.inodes.get(d)}
    for fh in fhs[::3] + fhs[1::3] + fhs[2::3]:
        if fh < 0:
            await ops.releasedir(-fh)
        else:
            await ops.release(fh)
        assert ops.check() == []
    assert ops._held == {} and ops.handles == {}
    await drv.finish()
