"""The upper's cache of directory fds (``Upper.borrow_dir``/``forget_dirs``): a
directory renamed or removed drops its own fd and every one below it, and no
other (a sibling whose name starts with its name stays: ``a.dpkg-new`` is not
below ``a``). Random borrows and forgets against what a scan of the cache
would drop."""
from __future__ import annotations

import os
import random

from mergefs.union.upper import DIR_FD_CACHE, Upper


def test_forget_dirs_drops_exactly_a_subtree(tmp_path):
    up, wk = tmp_path / "up", tmp_path / "wk"
    paths = []
    for top in ("a", "a.b", "a-c", "ab", "b", "a0", "a/x.y"):
        for sub in ("", "/x", "/x/y", "/z"):
            (up / (top + sub)).mkdir(parents=True, exist_ok=True)
            paths.append((top + sub).encode())
    for i in range(DIR_FD_CACHE):                  # enough to make the cache evict
        (up / "many" / str(i)).mkdir(parents=True)
        paths.append(b"many/%d" % i)
    wk.mkdir()
    upper = Upper(str(up), str(wk))
    try:
        rnd = random.Random(1)
        for _ in range(20_000):
            p = rnd.choice(paths)
            if rnd.random() < 0.8:
                fd = upper.borrow_dir(p)
                assert os.path.samestat(os.fstat(fd), os.stat(up / os.fsdecode(p)))
            else:
                before = set(upper._dirs)
                upper.forget_dirs(p)
                assert set(upper._dirs) == {q for q in before
                                            if q != p and not q.startswith(p + b"/")}, p
            assert len(upper._dirs) <= DIR_FD_CACHE
            assert upper._sorted == sorted(upper._dirs)
        upper.forget_dirs(b"")
        assert not upper._dirs and not upper._sorted
    finally:
        upper.close()
