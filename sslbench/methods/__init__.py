"""Registry of pre-training methods: recipe name -> class (imported lazily)."""
from __future__ import annotations

import importlib

#: name in methods/<name>.yaml -> "module:Class" under sslbench.methods. scratch has no pre-training.
REGISTRY: dict[str, str] = {
    "voco": "sslbench.methods.voco:VoCo",
}


def get_method_class(name: str):
    target = REGISTRY.get(name)
    if target is None:
        return None
    module, cls = target.split(":")
    return getattr(importlib.import_module(module), cls)
