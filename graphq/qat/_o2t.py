"""The one place graphq imports onnx2torch.

onnx2torch 1.5.15 imports torchvision at import time (for its NonMaxSuppression and RoiAlign
converters). torchvision is not a dependency of graphq: installed next to a CPU torch it either
pulls a CUDA torch of several GB or fails to import (``operator torchvision::nms does not
exist``). So onnx2torch is installed with ``pip install --no-deps onnx2torch`` and imported
here: when torchvision cannot be imported, a stand-in module is placed in ``sys.modules`` for
the duration of the import only. Its ``ops`` functions raise a clear error, so a graph with
NonMaxSuppression or RoiAlign converts but says what is missing when run; every other
converter works. graphq's own converters are registered on the first import.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

from graphq.errors import QAT_INSTALL as INSTALL_HINT
from graphq.errors import GraphqError

_loaded: Any = None


def _missing_torchvision(op: str):
    def fail(*args: Any, **kwargs: Any) -> Any:
        raise GraphqError(f"{op} needs torchvision, which is not importable here; install a "
                          "torchvision built for this torch to run it in PyTorch")
    return fail


def _torchvision_stand_in() -> types.ModuleType:
    tv = types.ModuleType("torchvision")
    ops = types.ModuleType("torchvision.ops")
    ops.nms = _missing_torchvision("NonMaxSuppression")
    ops.box_convert = _missing_torchvision("NonMaxSuppression")
    ops.roi_align = _missing_torchvision("RoiAlign")
    tv.ops = ops
    tv.__graphq_stand_in__ = True
    return tv


def _torchvision_works() -> bool:
    try:
        importlib.import_module("torchvision")
        return True
    except Exception:  # noqa: BLE001 - ImportError, or RuntimeError from a mismatched build
        for name in [n for n in sys.modules if n == "torchvision" or
                     n.startswith("torchvision.")]:
            del sys.modules[name]
        return False


def onnx2torch() -> Any:
    """The onnx2torch module, with graphq's converters registered (imported once)."""
    global _loaded
    if _loaded is not None:
        return _loaded
    try:
        importlib.import_module("torch")
    except ImportError as exc:
        raise GraphqError(f"torch is not installed; {INSTALL_HINT}") from exc
    stand_in = None
    if not _torchvision_works():
        stand_in = _torchvision_stand_in()
        sys.modules["torchvision"] = stand_in
        sys.modules["torchvision.ops"] = stand_in.ops
    try:
        module = importlib.import_module("onnx2torch")
    except ImportError as exc:
        raise GraphqError(f"onnx2torch is not installed; {INSTALL_HINT}") from exc
    finally:
        if stand_in is not None:
            for name, mod in (("torchvision", stand_in), ("torchvision.ops", stand_in.ops)):
                if sys.modules.get(name) is mod:
                    del sys.modules[name]
    from graphq.qat import converters

    converters.register()
    _loaded = module
    return module
