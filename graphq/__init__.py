"""graphq: a graph-rewriting compiler pass library for ONNX, whose main job is quantization.

Python API::

    import graphq
    pm = graphq.PassManager.from_toml("passes.toml")   # or a preset name, or build in Python
    result = pm.run("model.onnx", outdir="out")
"""

__version__ = "0.1.0"

from graphq.errors import ConfigError, DataError, GraphqError, ModelError, PassError  # noqa: E402
from graphq.model import load, save  # noqa: E402
from graphq.pipeline import PassManager, RunResult  # noqa: E402
from graphq.registry import Pass, PassContext, PassResult, register  # noqa: E402
from graphq.registry import passes as registered_passes  # noqa: E402

__all__ = [
    "ConfigError", "DataError", "GraphqError", "ModelError", "PassError",
    "Pass", "PassContext", "PassManager", "PassResult", "RunResult",
    "load", "register", "registered_passes", "save", "__version__",
]
