"""The built-in passes, one per module; importing this package registers them."""

from graphq.passes import calibrate, canonicalize, emit, fold_bn, insert_qdq, qat  # noqa: F401
