"""Put on PYTHONPATH with ARTQUANT_TEST_STALL_AFTER_BATCHES=N: every Ray scoring actor started below scores N batches
and then stalls, so a test can kill `artquant score --engine ray` mid-run on a machine of any speed.

Ray workers inherit the driver's environment, and each imports `artquant.serve.dataset` itself to rebuild the actor
class; this wraps that module's loading to slow the class down there, and changes nothing anywhere else."""

import importlib.abc
import itertools
import os
import sys
import time

_MODULE = "artquant.serve.dataset"
_STALL_AFTER = int(os.environ.get("ARTQUANT_TEST_STALL_AFTER_BATCHES", "0"))


def _stall_scoring(module) -> None:
    score, calls = module.ScoringActor.__call__, itertools.count()

    def stalling_call(self, batch):
        if next(calls) >= _STALL_AFTER:  # (next() on a count is atomic: the actor may run batches on several threads)
            time.sleep(3600)  # until the test kills the run
        return score(self, batch)

    module.ScoringActor.__call__ = stalling_call


class _StallOnImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != _MODULE:
            return None
        for finder in sys.meta_path:
            spec = None if finder is self else getattr(finder, "find_spec", lambda *a: None)(name, path, target)
            if spec is not None:
                break
        else:
            return None
        exec_module = spec.loader.exec_module

        def exec_then_stall(module):
            exec_module(module)
            _stall_scoring(module)

        spec.loader.exec_module = exec_then_stall
        return spec


if _STALL_AFTER > 0:
    sys.meta_path.insert(0, _StallOnImport())
