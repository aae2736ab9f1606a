"""How to serve a merge: ``choose_strategy(spec, capabilities, intent) -> Decision``.

A pure function: the caller gathers facts (``MergeSpec`` from the store's
metadata, ``Capabilities`` from the machine) and gets back a strategy and the
reasons, one line each, that ``mergefs merge --explain`` prints.

The two paths (docs/architecture.md, "Serving paths"): a **farm** costs one hardlink per file
up front, then reads at native speed and survives reboots; a **union** costs
nothing up front (only metadata is stored) and pays a FUSE round trip per
uncached request while mounted. Thresholds come from ``tools/bench_store.py``
(see FARM_US_PER_ENTRY / UNION_MOUNT_MS below and the numbers in its
docstring), not guesses.
"""
from __future__ import annotations

from dataclasses import dataclass, field

STRATEGIES = ("farm", "union")
INTENTS = ("inspect", "rootfs", "export")

# Measured by tools/bench_store.py --only policy --reps 10 on the development VM
# (2 cores, journaled ext4 on a loop device; medians): farm build 0.012 s / 1k files,
# 0.052 s / 3k, 0.143 s / 10k, 0.280 s / 30k, 0.947 s / 100k (9-17 us per file; above
# 1,024 entries forked workers share the build); `mergefs mount` of the same 8 layers
# live after 0.18-0.23 s at every size. They cross near 14k files.
FARM_US_PER_ENTRY = 12.0      # farm build time per merged entry
UNION_MOUNT_MS = 175.0        # `mergefs mount` of a union until the mount is live
# Below this many entries a farm is built in about the time a union mount takes
# to come up, so there is nothing to save by going live.
FARM_FREE_ENTRIES = int(UNION_MOUNT_MS * 1000 / FARM_US_PER_ENTRY)
# Without an intent, a farm is built up to this size (~1 s of linking at 100k): one
# full read of a 100k-file tree through FUSE costs more than that (README, measured: warm tar
# 12.1 s fuse-overlayfs vs 1.43 s kernel), so the farm pays back after one read.
# Beyond it the merge is served live unless it is reused often.
FARM_DEFAULT_MAX_ENTRIES = 100_000
REUSE_FOR_FARM = 3            # merges asked for this often amortise a farm of any size
LINK_MAX = 65_000             # ext4's per-inode link limit (EMLINK beyond it)


@dataclass(frozen=True)
class MergeSpec:
    """Facts about the merge, from the store's metadata."""
    layers: int                      # flattened inputs
    entries: int                     # sum of the inputs' entry counts recorded at import
    reuse_count: int = 0             # times this merge was asked for before
    max_input_links: int = 1         # highest link count a farm would add to (per input inode)
    writable: bool = False           # will be mounted writable (a union upper goes on top)
    requested: str = "auto"          # auto | farm | union


@dataclass(frozen=True)
class Capabilities:
    """Facts about the machine and the store."""
    fuse: bool = True                # /dev/fuse usable: a union can be served
    inputs_on_store_fs: bool = True  # every input layer is on the store's filesystem
    link_max: int = LINK_MAX


@dataclass(frozen=True)
class Decision:
    strategy: str
    reasons: tuple[str, ...] = field(default=())


def choose_strategy(spec: MergeSpec, capabilities: Capabilities,
                    intent: str | None = None) -> Decision:
    """The strategy for ``spec`` and why, first matching rule wins."""
    caps = capabilities
    if spec.requested in STRATEGIES:
        return Decision(spec.requested, (f"--strategy {spec.requested} was requested",))
    facts = (f"{spec.layers} layers, ~{spec.entries} entries recorded at import; "
             f"farm ~{spec.entries * FARM_US_PER_ENTRY / 1000:.0f} ms to build, "
             f"union ~{UNION_MOUNT_MS:.0f} ms to mount",)
    if not caps.fuse:
        return Decision("farm", facts + ("no usable /dev/fuse: a union could not be served",))
    if not caps.inputs_on_store_fs:
        return Decision("union", facts + ("inputs are not on the store's filesystem: a farm "
                                          "would copy every file (EXDEV)",))
    if spec.max_input_links + 1 >= caps.link_max:
        return Decision("union", facts + (f"an input inode has {spec.max_input_links} links: "
                                          f"a farm would hit the link limit ({caps.link_max}, "
                                          "EMLINK) and copy",))
    if spec.entries <= FARM_FREE_ENTRIES:
        return Decision("farm", facts + (f"small: at most {FARM_FREE_ENTRIES} entries build "
                                         "as fast as a union mounts",))
    if intent == "inspect":
        return Decision("union", facts + ("--for inspect: a union is live at once and "
                                          "nothing is materialised",))
    if intent == "rootfs":
        return Decision("farm", facts + ("--for rootfs: long-lived and read often: native "
                                         "reads pay back the links",))
    if intent == "export":
        return Decision("farm", facts + ("--for export: every file is read once; native reads "
                                         "beat FUSE round trips",))
    if spec.reuse_count >= REUSE_FOR_FARM:
        return Decision("farm", facts + (f"asked for {spec.reuse_count} times: a farm "
                                         "amortises",))
    if spec.entries <= FARM_DEFAULT_MAX_ENTRIES:
        return Decision("farm", facts + (f"at most {FARM_DEFAULT_MAX_ENTRIES} entries: a farm "
                                         "builds in seconds and reads natively",))
    return Decision("union", facts + (f"more than {FARM_DEFAULT_MAX_ENTRIES} entries and no "
                                      "intent: served live rather than linked",))
