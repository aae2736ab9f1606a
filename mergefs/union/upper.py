"""Writes into a union's upper directory, in kernel overlayfs format (U4, D6).

The upper is a layer like any other, written only here: whiteouts are
character devices 0/0, an opaque directory carries ``trusted.overlay.opaque=y``
(``user.overlay.opaque`` when not root, as overlayfs's ``userxattr``). Every
copy-up, and every new entry that replaces a whiteout, is built in the work
directory, given its data, owner, mode, xattrs and times there (A1 order:
chown, chmod, xattrs, times), and only then moved into the upper: a crash
leaves at most litter in the work dir, never a half-copied file in the merged
view. A regular file's copy is an unnamed file (O_TMPFILE, as kernel
overlayfs makes it where it can), filled through its fd and linked into the
upper when complete (a crash leaves nothing at all); that fd then serves the
write that caused the copy-up. Other entries get a temporary name and are
renamed. A new entry at a name that hides nothing
is made in place (``make_in_place``, as kernel overlayfs does): a crash there
leaves at most an empty entry of mode 0.

Placing an entry where the upper holds a whiteout: a non-directory is renamed
over it; a directory is swapped with it (RENAME_EXCHANGE) and the whiteout,
now in the work dir, is unlinked -- the same dance kernel overlayfs does.
"""
from __future__ import annotations

import bisect
import errno
import itertools
import logging
import os
import stat
from collections import OrderedDict

from .. import syscalls
from ..attrs import set_xattrs
from ..errors import InvalidLayer
from ..layer import DIR, LNK, REG, Layer, content_xattrs, mark_overlay, open_layer_root
from .fastpath import compiled
from .linknames import moved_dirs

log = logging.getLogger("mergefs.union")
WHITEOUT_DEV = 0
STAGED_PREFIX = "#mergefs-"
DIR_FD_CACHE = 128


def _initial_user_namespace() -> bool:
    """uid 0 of a user namespace (rootless podman) cannot set trusted.* xattrs."""
    try:
        with open("/proc/self/uid_map") as f:
            return f.read().split() == ["0", "0", "4294967295"]
    except OSError:
        return True


class Upper:
    """The upper layer (read through ``layer`` like the lowers) and its work dir."""

    def __init__(self, upper: str | bytes, work: str | bytes):
        self.layer = Layer(upper, "overlay")
        mark_overlay(self.layer.fd)   # overlay format whatever its names, for every reader
        self.work_fd = open_layer_root(os.fsencode(work))
        self.dev = os.fstat(self.layer.fd).st_dev
        if os.fstat(self.work_fd).st_dev != self.dev:
            os.close(self.work_fd)
            raise InvalidLayer("the work dir must be on the upper's filesystem")
        self._sweep_work()
        root = os.geteuid() == 0 and _initial_user_namespace()
        self.opaque_xattr = "trusted.overlay.opaque" if root else "user.overlay.opaque"
        self.ino_xattr = self.opaque_xattr.replace("opaque", "mergefs-ino")   # record_number
        self._names = itertools.count()
        self._dirs: OrderedDict[bytes, int] = OrderedDict()   # path -> open dir fd (LRU)
        self._sorted: list[bytes] = []        # its paths, sorted: a subtree's are one run
        # What the upper's directories carry, read or set once while no directory of
        # the upper is renamed or removed (``forget_dirs`` drops both):
        self._numbered: set[bytes] = set()        # dirs marked ``mark_numbered``
        self._moves: list | None = None           # ``moved_dirs()``
        self.tmpfile = True           # O_TMPFILE in the work dir (False once refused)
        self._no_range: set[int] = set()   # source st_dev copy_file_range to the upper refused
        # make_in_place: who owns what this process creates, and the mode bits that
        # creating cannot set exactly (the umask's, set-id and sticky)
        self._creator = (os.geteuid(), os.getegid())
        self._not_exact = _umask() | 0o7000
        self._staged_owner: tuple[int, int] | None | bool = False   # ``staged_owner``
        # fsync a copy-up's file before a name shows it, as kernel overlayfs does
        # unless "volatile"; off by default, as fuse-overlayfs (one fsync per copy:
        # the append step ~5-10x slower on ext4); ops: MERGEFS_COPYUP_FSYNC=1
        self.sync_copies = False

    def close(self) -> None:
        self.forget_dirs(b"")
        os.close(self.work_fd)
        self.layer.close()

    def _sweep_work(self) -> None:
        """Remove what a crashed server left staged in the work dir (only our names)."""
        for name in os.listdir(self.work_fd):
            if name.startswith(STAGED_PREFIX):
                st = os.lstat(name, dir_fd=self.work_fd)
                if stat.S_ISDIR(st.st_mode):
                    syscalls.rmtree(name, dir_fd=self.work_fd)    # iterative: any depth
                else:
                    os.unlink(name, dir_fd=self.work_fd)
                log.info("removed %s left in the work dir by an earlier server", name)

    # -- primitives -------------------------------------------------------
    def tmp_name(self) -> bytes:
        return b"%s%d-%d" % (STAGED_PREFIX.encode(), os.getpid(), next(self._names))

    def dir_fd(self, path: bytes) -> int:
        """A new fd on the upper's directory ``path``; the caller closes it."""
        return os.dup(self.borrow_dir(path))

    def borrow_dir(self, path: bytes) -> int:
        """The cached fd of the upper's directory ``path``: never close it; valid
        until the next call that changes the upper's directories (the cache
        keeps the last DIR_FD_CACHE; every rename or removal of an upper
        directory goes through ``forget_dirs``)."""
        fd = self._dirs.get(path)
        if fd is not None:
            self._dirs.move_to_end(path)
            return fd
        fd = syscalls.open_beneath(self.layer.fd, path)
        self._dirs[path] = fd
        bisect.insort(self._sorted, path)
        if len(self._dirs) > DIR_FD_CACHE:
            old, old_fd = self._dirs.popitem(last=False)
            del self._sorted[bisect.bisect_left(self._sorted, old)]
            os.close(old_fd)
        return fd

    def forget_dirs(self, path: bytes) -> None:
        """Drop the cached fds of ``path`` and everything below it (b"": all), and
        what was read or set on the upper's directories (their paths change).
        The paths below ``path`` are the sorted run from ``path/`` up to ``path0``
        ("0" follows "/"): no scan of the whole cache per directory renamed."""
        self._numbered.clear()
        self._moves = None
        paths = self._sorted
        if not path:
            lo, hi = 0, len(paths)
        else:
            lo = bisect.bisect_left(paths, path)
            hi = bisect.bisect_left(paths, path + b"0", lo)
        gone = [p for p in paths[lo:hi] if not path or p == path or p[len(path)] == 47]   # "/"
        for p in gone:
            os.close(self._dirs.pop(p))
        if gone:
            self._sorted = [p for p in paths if p in self._dirs]

    def lstat(self, path: bytes) -> os.stat_result | None:
        parent, _, name = path.rpartition(b"/")
        try:
            return syscalls.lstat(name, self.borrow_dir(parent))
        except FileNotFoundError:
            return None

    def is_whiteout(self, path: bytes) -> bool:
        st = self.lstat(path)
        return st is not None and syscalls.is_whiteout_stat(st)

    def made_mode(self, st: os.stat_result) -> int | None:
        """The mode to make a copy of ``st`` with in the work dir so that it needs
        no chmod (and maybe no chown, ``set_meta``): its own where the umask keeps
        it and it has no set-id or sticky bit, else None (made 0o600 or 0o700,
        fixed up by ``set_meta``). The copy is in the work dir, unnamed or under a
        name no one looks up, until it is complete (crash-safe either way)."""
        mode = stat.S_IMODE(st.st_mode)
        return None if mode & self._not_exact or self.staged_owner() is None else mode

    def staged_owner(self) -> tuple[int, int] | None:
        """(uid, gid) what this process makes in the work dir gets (its own, or the
        work dir's group where the filesystem gives that: ``grpid``), read once
        from an unnamed probe file; None where it cannot tell, or the work dir is
        set-gid (a directory made there would be set-gid too)."""
        if self._staged_owner is False:
            owner = None
            if not os.fstat(self.work_fd).st_mode & stat.S_ISGID:
                try:
                    fd = os.open(b".", os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600,
                                 dir_fd=self.work_fd)
                except OSError:
                    pass
                else:
                    st = os.fstat(fd)
                    os.close(fd)
                    owner = (st.st_uid, st.st_gid)
            self._staged_owner = owner
        return self._staged_owner

    def set_meta(self, name: bytes, st, xattrs: dict[str, bytes] | None = None,
                 times: bool = True, fd: int = -1, number: int | None = None,
                 made: int | None = None) -> None:
        """Owner, mode, xattrs (and the inode ``number`` to keep, U8), times on a
        staged entry in the work dir (A1 order); ``fd``: on the open file instead
        (``name`` b""). ``made``: the entry was made with ``made_mode(st)`` (not
        None): no chown where the work dir gave it the right owner already, no
        chmod (that mode has no set-id bit a chown would clear)."""
        if fd < 0:
            fd = self.work_fd
        if made is None or (st.st_uid, st.st_gid) != self._staged_owner:
            syscalls.lchown(name, st.st_uid, st.st_gid, fd)
        if not stat.S_ISLNK(st.st_mode) and made != stat.S_IMODE(st.st_mode):
            syscalls.chmod(name, stat.S_IMODE(st.st_mode), fd)
        if xattrs:
            warnings: list[str] = []
            set_xattrs(fd, name, xattrs, warnings)   # A3: refused ones reported, ENOSPC raised
            for w in warnings:
                log.warning("copy-up: %s", w)
        if number is not None:
            self.record_number(name, number, fd)
        if times and not name:          # the open copy (stage_file): no path to make
            os.utime(fd, ns=(st.st_atime_ns, st.st_mtime_ns))
        elif times:
            syscalls.utime_ns(name, st.st_atime_ns, st.st_mtime_ns, fd)

    def publish(self, tmp: bytes | None, path: bytes, keep_parent_times: bool = False,
                fd: int = -1) -> os.stat_result:
        """Move a staged entry to ``path`` in the upper (over a whiteout if one is there);
        ``tmp`` None: link the unnamed file open as ``fd`` there (``stage_file``).

        A copy-up is not a change of the parent: ``keep_parent_times`` restores
        its times afterwards, as kernel overlayfs does (ovl_set_timestamps).
        """
        parent, _, name = path.rpartition(b"/")
        try:
            pfd = self.borrow_dir(parent)
        except BaseException:
            if tmp is not None:
                self.discard(tmp)
            raise
        if keep_parent_times:
            pst = os.fstat(pfd)
            try:
                return self._place(tmp, path, pfd, fd, name)
            finally:
                os.utime(pfd, ns=(pst.st_atime_ns, pst.st_mtime_ns))
        return self._place(tmp, path, pfd, fd, name)

    def _place(self, tmp: bytes | None, path: bytes, pfd: int, fd: int,
               name: bytes) -> os.stat_result:
        if tmp is None:
            try:         # the name is free (what a copy-up finds): linked in at once
                os.link(b"/proc/self/fd/%d" % fd, name, dst_dir_fd=pfd, follow_symlinks=True)
                return os.fstat(fd)
            except FileExistsError:     # a whiteout there: named in the work dir, renamed
                tmp = self.tmp_name()
                os.link(b"/proc/self/fd/%d" % fd, tmp, dst_dir_fd=self.work_fd,
                        follow_symlinks=True)
        try:
            self._rename_into(tmp, path, pfd)
        except BaseException:
            self.discard(tmp)          # the view is unchanged: drop the staged entry
            raise
        return os.fstat(fd) if fd >= 0 else syscalls.lstat(name, pfd)

    def _rename_into(self, tmp: bytes, path: bytes, pfd: int) -> None:
        name = path.rpartition(b"/")[2]
        try:            # nothing there, mostly: no lstat of either name first
            syscalls.renameat2(self.work_fd, tmp, pfd, name, syscalls.RENAME_NOREPLACE)
            return
        except FileExistsError:
            pass
        old = syscalls.lstat(name, pfd)
        if stat.S_ISDIR(old.st_mode):
            self.forget_dirs(path)
        is_dir = stat.S_ISDIR(syscalls.lstat(tmp, self.work_fd).st_mode)
        if is_dir:
            # a dir cannot be renamed over a char device: swap, then drop it
            syscalls.renameat2(self.work_fd, tmp, pfd, name, syscalls.RENAME_EXCHANGE)
            _remove(tmp, self.work_fd)
        else:
            os.rename(tmp, name, src_dir_fd=self.work_fd, dst_dir_fd=pfd)

    # -- building entries --------------------------------------------------
    def copy_of(self, src_root_fd: int, path: bytes, st: os.stat_result,
                with_data: bool = True, number: int | None = None) -> bytes:
        """Stage a copy of a lower entry (no children for dirs; ``number`` recorded,
        U8); return its tmp name."""
        tmp = self.tmp_name()
        parent, _, name = path.rpartition(b"/")
        sfd = syscalls.open_beneath(src_root_fd, parent)
        try:
            kind = stat.S_IFMT(st.st_mode)
            if kind == DIR:
                syscalls.mkdir(tmp, self.work_fd, 0o700)
            elif kind == LNK:
                syscalls.symlink(syscalls.readlink(name, sfd), tmp, self.work_fd)
            elif kind == REG:
                syscalls.copy_file(sfd, name, self.work_fd, tmp, st.st_size if with_data else 0)
            else:
                syscalls.mknod(tmp, kind | 0o600, st.st_rdev, self.work_fd)
            self.set_meta(tmp, st, content_xattrs(sfd, name), number=number)
        except BaseException:
            self.discard(tmp)        # a failed copy-up (ENOSPC ...) leaves nothing behind
            raise
        finally:
            os.close(sfd)
        return tmp

    def stage_file(self, src_root_fd: int, path: bytes, number: int | None,
                   with_data: bool = True) -> tuple[os.stat_result, bytes | None, int]:
        """Stage a copy of the lower regular file ``path`` (its data unless not
        ``with_data``, owner, mode, xattrs, times; ``number`` recorded, U8), all
        through fds: (the lower file's lstat, the copy's name in the work dir or
        None for an unnamed O_TMPFILE one, an O_RDWR fd on the copy). ``publish``
        links it into the upper; the caller closes the fd. A failure (ENOSPC ...)
        leaves nothing: an unnamed file vanishes with its fd."""
        sfd = syscalls.open_beneath(src_root_fd, path, syscalls.O_READ)
        try:
            st = os.fstat(sfd)
            if not stat.S_ISREG(st.st_mode):        # the layer changed under us
                raise OSError(errno.ESTALE, os.strerror(errno.ESTALE), path)
            made = self.made_mode(st)
            tmp, fd = self._new_file(0o600 if made is None else made)
            try:
                if with_data and st.st_size:
                    self._copy_data(sfd, fd, st)
                self.set_meta(b"", st, content_xattrs(sfd, b""), fd=fd, number=number,
                              made=made)
                if self.sync_copies:
                    os.fsync(fd)
            except BaseException:
                os.close(fd)
                if tmp is not None:
                    self.discard(tmp)
                raise
        finally:
            os.close(sfd)
        return st, tmp, fd

    def copy_up_file(self, src_dir_fd: int, name: bytes, path: bytes, number: int,
                     with_data: bool = True, xattrs: bool = True
                     ) -> tuple[int, int, int, os.stat_result | None]:
        """The lower regular file ``name`` in ``src_dir_fd`` copied to ``path`` in the
        upper: ``stage_file`` then ``publish`` keeping the parent's times (``number``
        recorded, U8; ``xattrs`` False: the caller knows it has no content xattrs).
        Returns (an O_RDWR fd on the copy, for the caller to close; the copy's
        st_ino; the lower file's st_nlink; the copy's lstat or None). Done in one
        C call (``_fastpath.copy_up_file``, the same syscalls) where the module is
        built; here for what C leaves: no O_TMPFILE, an xattr the upper refuses
        (reported here), a whiteout at ``path``."""
        fast = compiled("copy_up_file")     # None: no module built from these sources
        if fast is not None and self.tmpfile:
            parent, _, leaf = path.rpartition(b"/")
            got = fast(src_dir_fd, name, self.work_fd, self.borrow_dir(parent), leaf, with_data,
                       xattrs, self._not_exact, self.staged_owner(), self.ino_xattr, number,
                       self._no_range, self.sync_copies)
            fd = got[0]
            if fd is not None:
                if got[3]:
                    return fd, got[1], got[2], None
                try:            # the name is taken (a whiteout): renamed over it
                    new = self.publish(None, path, keep_parent_times=True, fd=fd)
                except BaseException:
                    os.close(fd)
                    raise
                return fd, new.st_ino, got[2], new
        st, tmp, fd = self.stage_file(src_dir_fd, name, number, with_data)
        try:
            new = self.publish(tmp, path, keep_parent_times=True, fd=fd)
        except BaseException:
            os.close(fd)
            raise
        return fd, new.st_ino, st.st_nlink, new

    def copy_up_dir(self, src_root_fd: int, src: bytes, path: bytes, number: int,
                    xattrs: bool = True) -> tuple[int, os.stat_result | None]:
        """The lower directory ``src`` (below ``src_root_fd``; no children) copied to
        ``path`` in the upper: ``stage_dir`` then ``publish`` keeping the parent's
        times. Returns (the copy's st_ino, its lstat or None). In one C call
        (``_fastpath.copy_up_dir``, the same syscalls) where the module is built;
        here for what C leaves: an xattr the upper refuses (reported here), a
        whiteout at ``path`` (C leaves the copy staged)."""
        fast = compiled("copy_up_dir")      # None: no module built from these sources
        if fast is not None:
            parent, _, leaf = path.rpartition(b"/")
            tmp = self.tmp_name()
            got = fast(src_root_fd, src, self.work_fd, tmp, self.borrow_dir(parent), leaf,
                       xattrs, self._not_exact, self.staged_owner(), self.ino_xattr, number)
            if got[0] is not None:
                if got[1]:
                    return got[0], None
                new = self.publish(tmp, path, keep_parent_times=True)   # over a whiteout
                return new.st_ino, new
        _, tmp = self.stage_dir(src_root_fd, src, number)
        new = self.publish(tmp, path, keep_parent_times=True)
        return new.st_ino, new

    def stage_dir(self, src_root_fd: int, path: bytes,
                  number: int) -> tuple[os.stat_result, bytes]:
        """Stage a copy of the lower directory ``path`` (no children; owner, mode,
        xattrs, times, ``number`` recorded): (its lstat, the copy's name in the
        work dir). Read through one fd on the lower dir itself."""
        sfd = syscalls.open_beneath(src_root_fd, path)
        try:
            st = os.fstat(sfd)
            tmp = self.tmp_name()
            made = self.made_mode(st)
            syscalls.mkdir(tmp, self.work_fd, 0o700 if made is None else made)
            try:
                self.set_meta(tmp, st, content_xattrs(sfd, b""), number=number, made=made)
            except BaseException:
                self.discard(tmp)
                raise
        finally:
            os.close(sfd)
        return st, tmp

    def _new_file(self, mode: int = 0o600) -> tuple[bytes | None, int]:
        """(None, fd) of an unnamed file in the work dir, or (its name, fd) where the
        filesystem has no O_TMPFILE; made with ``mode``."""
        if self.tmpfile:
            try:
                return None, os.open(b".", os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, mode,
                                     dir_fd=self.work_fd)
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                    raise
                self.tmpfile = False
        tmp = self.tmp_name()
        return tmp, os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                            mode, dir_fd=self.work_fd)

    def _copy_data(self, sfd: int, fd: int, st: os.stat_result) -> None:
        """copy_file_range where the two filesystems take it (remembered when not)."""
        if not syscalls.copy_data(sfd, fd, st.st_size, st.st_dev not in self._no_range):
            self._no_range.add(st.st_dev)

    def moved_dirs(self) -> list[tuple[bytes, bytes]]:
        """``linknames.moved_dirs`` of the upper, read once until a dir of it moves."""
        if self._moves is None:
            self._moves = moved_dirs(self.layer.fd, self.opaque_xattr.replace("opaque", "redirect"))
        return self._moves

    def discard(self, tmp: bytes) -> None:
        try:
            _remove(tmp, self.work_fd)
        except FileNotFoundError:
            pass

    def discard_tree(self, tmp: bytes) -> None:
        """Remove a staged tree (or entry) from the work dir, whatever it holds."""
        try:
            st = syscalls.lstat(tmp, self.work_fd)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            syscalls.rmtree(tmp, dir_fd=self.work_fd)     # iterative: any depth
        else:
            syscalls.unlink(tmp, self.work_fd)

    def new_entry(self, kind: int, mode: int, uid: int, gid: int, rdev: int = 0,
                  target: bytes = b"", opaque: bool = False) -> tuple[bytes, int]:
        """Stage a new entry; return (tmp name, fd for a regular file or -1)."""
        tmp, fd = self.tmp_name(), -1
        if kind == DIR:
            syscalls.mkdir(tmp, self.work_fd, 0o700)
            if opaque:
                syscalls.setxattr(self.work_fd, tmp, self.opaque_xattr, b"y")
        elif kind == LNK:
            syscalls.symlink(target, tmp, self.work_fd)
        elif kind == REG:
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600,
                         dir_fd=self.work_fd)
        else:
            syscalls.mknod(tmp, kind | 0o600, rdev, self.work_fd)
        syscalls.lchown(tmp, uid, gid, self.work_fd)
        if kind != LNK:
            syscalls.chmod(tmp, stat.S_IMODE(mode), self.work_fd)
        return tmp, fd

    def make_in_place(self, pfd: int, name: bytes, kind: int, mode: int, uid: int, gid: int,
                      rdev: int = 0, target: bytes = b"") -> tuple[os.stat_result, int]:
        """Create a new entry ``name`` in the upper's directory ``pfd`` (a kept fd,
        ``borrow_dir``) directly, where it hides
        nothing (no whiteout there, nothing below): what kernel overlayfs does
        outside its work dir. Returns (lstat, fd for a regular file or -1).

        Fewer syscalls than staging (no rename, no lstat of the work dir). An
        entry the server's own user is to own, with a mode the umask keeps and
        no set-id or sticky bit (``tar -x`` as root), is created with its final
        mode and needs no chown or chmod when its stat shows it right; any other
        is created with mode 0, then chowned and chmodded: a crash in between
        leaves an empty entry that is never set-id for the wrong owner."""
        final = (uid, gid) == self._creator and (kind == LNK or not mode & self._not_exact)
        made = stat.S_IMODE(mode) if final else 0
        fd = -1
        if kind == REG:
            fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                         made, dir_fd=pfd)
        elif kind == DIR:
            syscalls.mkdir(name, pfd, made)
        elif kind == LNK:
            syscalls.symlink(target, name, pfd)
        else:
            syscalls.mknod(name, kind | made, rdev, pfd)
        try:
            if final:
                st = os.fstat(fd) if fd >= 0 else syscalls.lstat(name, pfd)
                if st.st_uid == uid and st.st_gid == gid and \
                        (kind == LNK or stat.S_IMODE(st.st_mode) == made):
                    return st, fd
            if fd >= 0:
                os.fchown(fd, uid, gid)
                os.fchmod(fd, stat.S_IMODE(mode))
                return os.fstat(fd), fd
            syscalls.lchown(name, uid, gid, pfd)
            if kind != LNK:
                syscalls.chmod(name, stat.S_IMODE(mode), pfd)
            return syscalls.lstat(name, pfd), -1
        except BaseException:
            if fd >= 0:
                os.close(fd)
            _remove(name, pfd)        # the view is unchanged (EPERM, EDQUOT ...)
            raise

    def whiteout(self, path: bytes, tree: bool = False) -> None:
        """Replace whatever the upper has at ``path`` by a whiteout (char 0/0).

        An upper dir there must hold only whiteouts, unless ``tree`` (a dir
        moved away by copying): then its whole upper subtree goes."""
        tmp = self.tmp_name()
        syscalls.mknod(tmp, stat.S_IFCHR | 0o600, os.makedev(0, WHITEOUT_DEV), self.work_fd)
        parent, _, name = path.rpartition(b"/")
        pfd = self.borrow_dir(parent)
        try:        # nothing there or a non-dir: replaced at once (no lstat first)
            os.rename(tmp, name, src_dir_fd=self.work_fd, dst_dir_fd=pfd)
        except IsADirectoryError:       # a dir: swapped with the whiteout, then removed
            self.forget_dirs(path)
            syscalls.renameat2(self.work_fd, tmp, pfd, name, syscalls.RENAME_EXCHANGE)
            self.discard_tree(tmp) if tree else _remove(tmp, self.work_fd)

    def remove(self, path: bytes, is_dir: bool = True) -> None:
        """Remove the upper's entry at ``path`` (a dir with only whiteouts left in it);
        ``is_dir=False`` when the caller knows it is no directory (no cached fd to drop)."""
        parent, _, name = path.rpartition(b"/")
        if is_dir:
            self.forget_dirs(path)
        _remove(name, self.borrow_dir(parent))

    def set_opaque(self, path: bytes) -> None:
        parent, _, name = path.rpartition(b"/")
        syscalls.setxattr(self.borrow_dir(parent), name, self.opaque_xattr, b"y")

    def record_number(self, tmp: bytes, number: int, fd: int = -1) -> None:
        """A staged copy keeps its origin's inode number (U8, union/inodes.py);
        ``fd``: the copy's own (``tmp`` b"")."""
        try:
            if fd >= 0 and not tmp:     # the copy's own fd: no path to make
                os.setxattr(fd, self.ino_xattr, b"%d" % number)
            else:
                syscalls.setxattr(self.work_fd if fd < 0 else fd, tmp, self.ino_xattr,
                                  b"%d" % number)
        except OSError as e:    # no (user) xattrs here: the number holds for this mount only
            if e.errno not in (errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
                raise

    def mark_numbered(self, path: bytes) -> None:
        """The upper dir at ``path`` holds entries that record their number (set once)."""
        if path in self._numbered:
            return
        parent, _, name = path.rpartition(b"/")
        fd = self.borrow_dir(parent) if path else self.layer.fd
        syscalls.setxattr(fd, name, self.opaque_xattr.replace("opaque", "mergefs-inos"), b"y")
        self._numbered.add(path)

    def set_redirect(self, path: bytes, value: bytes) -> None:
        """Mark the upper dir at ``path`` as served below by ``value`` (R1)."""
        parent, _, name = path.rpartition(b"/")
        attr = self.opaque_xattr.replace("opaque", "redirect")
        self._moves = None
        syscalls.setxattr(self.borrow_dir(parent), name, attr, value)


def _umask() -> int:
    """This process's umask, read without changing it (/proc/self/status; all
    bits when the kernel does not tell: then nothing is made with its mode)."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o777


def _remove(name: bytes, dir_fd: int) -> None:
    """unlink, or rmdir after removing the whiteouts a merged-empty dir may hold."""
    try:
        syscalls.unlink(name, dir_fd)      # EISDIR from a dir: no lstat for every file
        return
    except IsADirectoryError:
        pass
    fd = syscalls.open_dir(name, dir_fd)
    try:
        for child in os.listdir(fd):
            cst = syscalls.lstat(os.fsencode(child), fd)
            if not syscalls.is_whiteout_stat(cst):
                raise OSError(errno.ENOTEMPTY, os.strerror(errno.ENOTEMPTY), name)
            syscalls.unlink(os.fsencode(child), fd)
    finally:
        os.close(fd)
    os.rmdir(name, dir_fd=dir_fd)
