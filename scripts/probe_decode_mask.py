"""GPU probe: run GPU tests with the decode graphs' padding mask on (as served) or off, to tell whether a test's
outcome depends on it.

    PYTHONPATH=. python3 scripts/probe_decode_mask.py mask|nomask TEST...

`nomask` replaces ModelRunner.graph_forward by the plain model call, so decode graphs route their padding rows like
real ones (and the expert counters count them); pytest runs in this process, so the replacement holds.
"""
import sys

import pytest

import model.engine.model_runner as mr

if sys.argv[1] not in ("mask", "nomask"):
    sys.exit("usage: probe_decode_mask.py mask|nomask TEST...")
if sys.argv[1] == "nomask":
    mr.ModelRunner.graph_forward = lambda self, batch: self.model(batch, self.kv_cache)
sys.exit(pytest.main(["-m", "gpu", "-q", "-p", "no:cacheprovider", *sys.argv[2:]]))
