"""Lets PyPI torchvision 0.28.0 import beside the CPU torch 2.13.0, for the reference image and video processors.

torchvision's import registers fake kernels for `torchvision::nms/qnms`, which fails when its compiled ops library does
not load against this torch; defining the two schemas first lets the import finish. Only pure-torch transforms are
used by the references, never these ops. Importing this module twice, or after torchvision, is harmless.
"""

from __future__ import annotations

import sys

import torch

_lib = None  # the Library must stay alive, or its definitions are dropped


def _define_schemas() -> None:
    global _lib
    if "torchvision" in sys.modules:
        return
    try:
        torch._C._dispatch_find_schema_or_throw("torchvision::nms", "")
        return  # already defined (by a working torchvision build or an earlier shim)
    except RuntimeError:
        pass
    _lib = torch.library.Library("torchvision", "DEF")
    _lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _lib.define("qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")


_define_schemas()

try:
    import torchvision  # noqa: F401

    HAVE_TORCHVISION = True
except (ImportError, RuntimeError, OSError):  # the references are unavailable; their tests skip
    HAVE_TORCHVISION = False
