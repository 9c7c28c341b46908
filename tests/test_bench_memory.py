"""The benchmark's memory figure covers the whole process tree (the command finds the lungs in a forked child)."""
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


@pytest.mark.skipif(not Path("/proc/self/smaps_rollup").exists(), reason="needs Linux /proc")
def test_tree_pss_counts_a_forked_childs_private_memory_once():
    import bench_diagnose as b

    code = ("import numpy as np, os, time\n"
            "shared = np.ones(120 << 20, np.uint8)\n"  # touched by the parent: shared with the child after fork
            "pid = os.fork()\n"
            "if pid == 0:\n"
            "    private = np.ones(80 << 20, np.uint8); shared.sum(); time.sleep(0.6); os._exit(0)\n"
            "os.waitpid(pid, 0)\n")
    wall, rss, rc = b._timed([sys.executable, "-c", code], dict(os.environ), sample_memory=True)
    tree = b._timed.last_tree_pss_mb
    assert rc == 0 and tree is not None
    # both arrays once (~200 MB + interpreters), not the shared array twice (~320 MB)
    assert 190 < tree < 280, tree
    assert rss >= 195  # the child's RSS alone holds both arrays
