"""The farm builder: a merge materialised as a directory of hardlinks.

* ``applier``  executes change records (the only writer; link, copy on
  EXDEV/EMLINK, recreate sockets, apply attributes);
* ``schedule`` runs directories in parallel, in threads or forked processes;
* ``build``    stages a build next to its output and publishes it by rename.
"""
from .applier import COPY_FALLBACK, Applier, FarmStats, merge_stats
from .build import DEFAULT_WORKERS, build_farm, pick_parallel, refuse_out_inside, staged_build

__all__ = ["COPY_FALLBACK", "Applier", "FarmStats", "merge_stats", "DEFAULT_WORKERS",
           "build_farm", "pick_parallel", "refuse_out_inside", "staged_build"]
