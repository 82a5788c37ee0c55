"""Registry of pre-training methods: recipe name -> class (imported lazily)."""
from __future__ import annotations

import importlib

#: name in methods/<name>.yaml -> "module:Class" under sslbench.methods. scratch has no pre-training.
REGISTRY: dict[str, str] = {
    "voco": "sslbench.methods.voco:VoCo",
    "mg": "sslbench.methods.genesis:ModelsGenesis",
    "transvw": "sslbench.methods.transvw:TransVW",
    "simsiam": "sslbench.methods.simsiam:SimSiam",
    "pcrlv1": "sslbench.methods.pcrl:PCRLv1",
    "pcrlv2": "sslbench.methods.pcrl:PCRLv2",
    "mae": "sslbench.methods.mae:MAE",
    "swinunetr-ssl": "sslbench.methods.swinunetr_ssl:SwinUNETRSSL",
    # the controls of the transfer path (labelled corpora; not self-supervised)
    "supervised": "sslbench.methods.supervised:Supervised",
    "supervised-task": "sslbench.methods.supervised:Supervised",
}


def get_method_class(name: str):
    """The class of a registered method, or None (unknown name, or its module is not written yet)."""
    target = REGISTRY.get(name)
    if target is None:
        return None
    module, cls = target.split(":")
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name == module:
            return None
        raise
    return getattr(mod, cls, None)
