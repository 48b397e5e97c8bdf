"""The backend skeletons every op shares, and the registration of an op's fused kernels.

An op module subclasses these per backend, adding only what is its own: ``OP``, tolerances, input limits and
the calls into its kernels::

    @register_backend
    class CpuBackend(_Tolerances, _backends.Cpp):
        OP, KERNEL = OP, "prefix_attention_fwd"
        ...

Fused backends (``cpu``: C++ in csrc/, ``triton``: kernels/) run their kernels inside a registered op with a fake
implementation and autograd. :func:`define_op` registers one: the C++ and FAISS paths as a
``torch.library.custom_op`` (opaque to torch.compile), the Triton path as a ``torch.library.triton_op``, whose
body torch.compile traces into, down to the ``wrap_triton`` kernel launches.
"""

from __future__ import annotations

from typing import Callable, ClassVar, Sequence

import torch

from clfast import _ext, _triton
from clfast.ops import _dispatch
from clfast.ops._dispatch import Backend

__all__ = ["FLOAT", "LOWP", "FAST_DTYPES", "Reference", "Torch", "Fused", "Cpp", "Triton", "TRITON_OPS",
           "define_op", "set_priorities"]

FLOAT = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
LOWP = (torch.bfloat16, torch.float16)
FAST_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what the fused kernels compute (fp32 accumulation)

# Triton ops are registered where the triton backend can run (a CUDA device, or TRITON_INTERPRET=1): decided
# once, at import, like every backend's availability.
TRITON_OPS = _triton.unavailable_reason() is None


class Reference(Backend):
    """The op's spec run as written: any device, every float dtype, differentiable by autograd."""

    NAME = "reference"
    DEVICES = ("cpu", "cuda")
    DTYPES = FLOAT


class Torch(Backend):
    """The best composition of stock PyTorch ops: the bar every fused backend must beat."""

    NAME = "torch"
    DEVICES = ("cpu", "cuda")
    DTYPES = FLOAT


class Fused(Backend):
    """A backend whose kernels run inside a registered op (``clfast::<op>``, or ``clfast::<op>_triton``)."""

    FUSED = True


class Cpp(Fused):
    """C++ kernels of the compiled extension (csrc/<op>/), registered as ``torch.ops._clfast_C.<KERNEL>``."""

    NAME = "cpu"
    DEVICES = ("cpu",)
    DTYPES = FAST_DTYPES
    KERNEL: ClassVar[str]  # the extension's kernel whose presence makes the backend available

    @classmethod
    def unavailable_reason(cls):
        return _ext.missing_op_reason(cls.KERNEL)


class Triton(_triton.TritonBackendMixin, Fused):
    """Triton kernels (kernels/<op>.py): CUDA, or the CPU under ``TRITON_INTERPRET=1`` (tests)."""

    NAME = "triton"
    DTYPES = FAST_DTYPES


def set_priorities(op: str, cpu: Sequence[str] = ("cpu", "torch", "reference"),
                   cuda: Sequence[str] = ("triton", "torch", "reference")) -> None:
    """The priority lists of ``op`` on the CPU and on CUDA (first that fits wins)."""
    _dispatch.set_priority(op, "cpu", cpu)
    _dispatch.set_priority(op, "cuda", cuda)


def define_op(name: str, schema: str, impl: Callable, fake: Callable, *, triton: bool = False):
    """Registers ``clfast::<name>`` with ``schema``, computed by ``impl(*args)``.

    ``triton=False``: a ``torch.library.custom_op`` with the shape-only ``fake``; torch.compile keeps it as one
    opaque node (C++, FAISS). ``triton=True``: a ``torch.library.triton_op``; ``impl`` must consist of torch ops
    and ``torch.library.wrap_triton`` launches, and serves as its own fake, so torch.compile sees the kernels
    (``fake`` is not used). Returns the op (a ``CustomOpDef``), ready for ``register_autograd``."""

    def body(*args):
        return impl(*args)  # for triton_op: a plain call by name, which torch follows to find the kernels

    if triton:
        return torch.library.triton_op(f"clfast::{name}", body, mutates_args=(), schema=schema)
    op = torch.library.custom_op(f"clfast::{name}", body, mutates_args=(), schema=schema)
    op.register_fake(fake)
    return op
