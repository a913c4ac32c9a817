"""Launch a compiled Triton kernel at the cost of one C call.

`kernel[grid](...)` binds and specializes every argument in Python on each call: tens of microseconds. A quantized
MoE forward makes thousands of small launches (four per expert and layer), so that host time, not the GPU, bounds
it. Once Triton has compiled a kernel for one class of arguments, a `Launcher` calls that compiled kernel directly
for later arguments of the same class, as torch.compile's generated launchers do. The class is at least as fine as
Triton's specialization: each tensor's dtype and 16-byte alignment, each integer's value class (1, a multiple of
16, 32- or 64-bit), with the constexprs and launch options fixed per Launcher and the current device. Tensors go
to the compiled kernel as their addresses (the callers check devices). Under the interpreter every launch goes
through Triton.
"""

from __future__ import annotations

import os

import torch
from triton import knobs
from triton.runtime.driver import driver

# Read once, as Triton does when it decorates a kernel: a kernel is interpreted or compiled for good.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def _argument_class(value) -> tuple:
    if isinstance(value, torch.Tensor):
        return value.dtype, value.data_ptr() % 16 == 0
    return value == 1, value % 16 == 0, -(2**31) <= value < 2**31


class Launcher:
    """`Launcher(kernel, **constexprs_and_options)(blocks, *args)` = `kernel[(blocks,)](*args, **constexprs...)`,
    `args` being the kernel's leading non-constexpr parameters in order and the constexprs the rest, in order."""

    def __init__(self, kernel, constexprs: dict, **options):
        self.kernel, self.constexprs, self.options = kernel, constexprs, options
        self.constexpr_values = tuple(constexprs.values())
        self.compiled: dict[tuple, object] = {}

    def __call__(self, blocks: int, *args) -> None:
        if INTERPRETED:
            self.kernel[(blocks,)](*args, **self.constexprs, **self.options)
            return
        device = driver.active.get_current_device()
        key = (device, *map(_argument_class, args))
        compiled = self.compiled.get(key)
        if compiled is None:
            self.compiled[key] = self.kernel[(blocks,)](*args, **self.constexprs, **self.options)
            return
        stream = driver.active.get_current_stream(device)
        args = (*(a.data_ptr() if isinstance(a, torch.Tensor) else a for a in args), *self.constexpr_values)
        compiled.run(
            blocks, 1, 1, stream, compiled.function, compiled.packed_metadata,
            compiled.launch_metadata((blocks,), stream, *args),
            knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook, *args,
        )
