"""Relational autodiff: tensors as relations of keyed tiles, models as SQL over them, gradients as SQL queries."""

from reldl.autodiff.builder import apply, count, grad, linear, matmul, max, mean, param, rename, sum, table
from reldl.autodiff.grad import Program, backward
from reldl.autodiff.ir import AutodiffError
from reldl.autodiff.kernels import KERNELS, install

__all__ = [
    "KERNELS",
    "AutodiffError",
    "Program",
    "apply",
    "backward",
    "count",
    "grad",
    "install",
    "linear",
    "matmul",
    "max",
    "mean",
    "param",
    "rename",
    "sum",
    "table",
]
