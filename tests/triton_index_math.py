"""What the interpreted Triton kernels compute their indices in: the ops' tests use it to show
that no pointer offset or integer product is int32 (which wraps past 2^31 elements), without
tensors that large."""

import contextlib
from unittest import mock

import numpy as np


@contextlib.contextmanager
def record_index_math():
    """Yields a list that collects, while interpreted Triton kernels run, the integer dtypes
    of every pointer offset and of every integer product they compute."""
    from triton.runtime import interpreter
    builder = interpreter.InterpreterBuilder
    seen = []
    create_mul, create_addptr = builder.create_mul, builder.create_addptr

    def mul(self, lhs, rhs):
        seen.append(("product", lhs.data.dtype, rhs.data.dtype))
        return create_mul(self, lhs, rhs)

    def addptr(self, ptr, offset):
        seen.append(("offset", offset.data.dtype))
        return create_addptr(self, ptr, offset)

    with mock.patch.object(builder, "create_mul", mul), mock.patch.object(builder, "create_addptr", addptr):
        yield seen


def int32_index_math(seen):
    """The entries of record_index_math's list that used an int32."""
    return sorted({entry for entry in seen if any(d == np.int32 for d in entry[1:] if d.kind in "iu")}, key=str)
