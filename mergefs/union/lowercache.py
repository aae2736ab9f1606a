"""What views over the same lowers share: merged listings and lstats of lower entries.

A ``LowerCache`` belongs to one lower stack (the same layer paths, bottom
first, and whiteout format). The union classes keep a listing per directory
inode and an lstat per inode; views over one image would each hold their own
copy of the same data. ``shared_view`` builds a ``UnionView`` or
``WritableView`` whose listings of directories no upper has touched, and whose
lstats of entries supplied by a lower layer, come from the stack's cache
(layers are immutable, so they never change), and so do the names of lower
hardlinks that a copy-up links together (``linknames``). A writable view
copies a shared listing before it changes it (``_set_child``), so a change
stays its own.
"""
from __future__ import annotations

from sortedcontainers import SortedDict

from ..layer import Layer
from ..mountspec import MountSpec
from .linknames import LinkNames
from .view import UnionView
from .writable import WritableView


class SharedListing(SortedDict):
    """A merged listing shared by views: never changed in place (with what reading
    it found: the directory's redirects and serving layers)."""
    redirects: tuple = ()
    sources: tuple | None = None


class LowerCache:
    def __init__(self):
        self.listings: dict[tuple, SharedListing] = {}
        self.stats: dict[tuple[int, int], object] = {}
        self.links = LinkNames()            # names of lower hardlinks (copy-up)
        self.users = 0

    def stat_for(self, node, st):
        """The one lstat object kept for a lower entry (``st`` if it is the first)."""
        return self.stats.setdefault((node.top, node.inos[0]), st)


class _Sharing:
    """Mixin over UnionView/WritableView (``self.cache``; ``self.up`` or None)."""

    cache: LowerCache
    up: int | None = None

    def _lower_only(self, node) -> bool:
        return self.up is None or self.up not in node.layers

    def listing(self, inode):
        if inode.children is None and inode.is_dir and self._lower_only(inode.node):
            key = (inode.node.layers, inode.node.inos)
            if self._take_shared(inode) is None:
                shared = self.cache.listings[key] = SharedListing(self.read_dir(inode))
                shared.redirects, shared.sources = inode.redirects, inode.sources
                inode.children = shared
        return super().listing(inode)

    def listed(self, inode):
        """The stack's listing counts as at hand (a lookup takes its answer there)."""
        if inode.children is None and inode.is_dir and self._lower_only(inode.node):
            self._take_shared(inode)
        return super().listed(inode)

    def _take_shared(self, inode):
        """The stack's cached listing of a lower-only directory, made the inode's
        (with its redirects and serving layers), or None when it has none."""
        shared = self.cache.listings.get((inode.node.layers, inode.node.inos))
        if shared is not None:
            if shared.redirects:
                self.redirected = True
            inode.redirects, inode.sources = shared.redirects, shared.sources
            inode.children = shared
        return shared

    def _looked_up(self, node, st):
        if self.up is None or node.top != self.up:
            return self.cache.stat_for(node, st)
        return super()._looked_up(node, st)

    def _reads_ahead(self, node) -> bool:
        """Not when the stack's cache has the directory's listing already."""
        return super()._reads_ahead(node) and (node.layers, node.inos) not in self.cache.listings

    def attr(self, inode):
        if inode.attr is None and (self.up is None or inode.node.top != self.up):
            key = (inode.node.top, inode.node.inos[0])
            st = self.cache.stats.get(key)
            if st is None:
                st = self.cache.stats[key] = self.resolver.lstat_in(
                    inode.node.top, self.layer_path(inode, inode.node.top))
            inode.attr = st
        return super().attr(inode)

    def _set_child(self, parent, name, node):
        if type(parent.children) is SharedListing:
            parent.children = SortedDict(parent.children)
        super()._set_child(parent, name, node)


class SharedUnionView(_Sharing, UnionView):
    def __init__(self, layers, cache: LowerCache):
        self.cache = cache
        super().__init__(layers)


class SharedWritableView(_Sharing, WritableView):
    def __init__(self, lowers, upper, work, cache: LowerCache):
        self.cache = cache
        super().__init__(lowers, upper, work)
        self.links = cache.links


def shared_view(spec: MountSpec, fmt: str, cache: LowerCache) -> UnionView:
    lowers = [Layer(p, fmt) for p in spec.lowers]
    if spec.upper is None:
        return SharedUnionView(lowers, cache)
    return SharedWritableView(lowers, spec.upper, spec.work, cache)
