"""The built-in passes, one per module; importing this package registers them."""

from graphq.passes import canonicalize, fold_bn  # noqa: F401
