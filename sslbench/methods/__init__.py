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

#: the 2D track (issue 23, ChestX-ray14 on the ResNet-18 U-Net of sslbench/models/unet2d.py): name -> the method's
#: 2D form (a class in the method's own file)
REGISTRY_2D: dict[str, str] = {
    "c2l": "sslbench.methods.c2l:C2L",
    "mg": "sslbench.methods.genesis:ModelsGenesis2D",
    "pcrlv1": "sslbench.methods.pcrl:PCRLv1_2D",
    "pcrlv2": "sslbench.methods.pcrl:PCRLv2_2D",
    "transvw": "sslbench.methods.transvw:TransVW2D",
    "voco": "sslbench.methods.voco:VoCo2D",
    "simsiam": "sslbench.methods.simsiam:SimSiam2D",
}


def get_method_class(name: str, spatial_dims: int = 3):
    """The class of a registered method (its 2D form for ``spatial_dims=2``), or None (unknown name, no form
    in those dimensions, or its module is not written yet)."""
    target = (REGISTRY_2D if spatial_dims == 2 else REGISTRY).get(name)
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
