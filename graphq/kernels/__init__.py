"""Numeric kernels shared by passes and the QAT bridge; a kernel never touches a graph."""
