"""Reading Scene-Graph-Benchmark config keys by attribute (shared by the SGB drop-ins)."""
from __future__ import annotations

MISSING = object()


def config_key(cfg, path: str, who: str, default=MISSING):
    """``cfg.A.B.C`` for ``path = "A.B.C"``, read by attribute (a yacs CfgNode, a SimpleNamespace
    tree, ...); ``default`` when a key on the path is absent, or a ValueError naming the key (and
    ``who`` reads it) when there is no default."""
    node = cfg
    for part in path.split("."):
        if not hasattr(node, part):
            if default is MISSING:
                raise ValueError(f"{who} reads the config key {path}, but cfg has no {path} (no {part!r} there): "
                                 "pass Scene-Graph-Benchmark's cfg (maskrcnn_benchmark/config/defaults.py defines "
                                 "the key), or build the module with keyword arguments")
            return default
        node = getattr(node, part)
    return node
