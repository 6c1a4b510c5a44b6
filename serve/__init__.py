"""Scale-out on Ray: the reward server (Ray Serve) and dataset scoring (Ray Data). Imports the core only.

Names load on first use, so that Ray's worker processes importing `artquant.serve.dataset` stay light.
"""

from importlib import import_module

_PUBLIC = {
    "RequestLimits": ".server",
    "build_app": ".server",
    "run_server": ".server",
    "score_dataset": ".dataset",
}
__all__ = list(_PUBLIC)


def __getattr__(name):
    if name in _PUBLIC:
        return getattr(import_module(_PUBLIC[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
