"""Launch a compiled Triton kernel at the cost of one C call.

`kernel[grid](...)` binds and specializes every argument in Python on each call: tens of microseconds. A quantized
MoE forward makes thousands of small launches (four per expert and layer), so that host time, not the GPU, bounds
it. Once Triton has compiled a kernel for one class of arguments, `launch` calls that compiled kernel directly for
later arguments of the same class, as torch.compile's generated launchers do. The class is at least as fine as
Triton's specialization: each tensor's dtype and 16-byte alignment, each integer's value class (1, a multiple of
16, 32- or 64-bit), the constexprs and launch options, the current device. Under the interpreter
(TRITON_INTERPRET=1) every launch goes through Triton.
"""

from __future__ import annotations

import os

import torch
from triton import knobs
from triton.runtime.driver import driver

_compiled: dict[tuple, object] = {}


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _argument_class(value) -> tuple:
    if isinstance(value, torch.Tensor):
        return value.dtype, value.data_ptr() % 16 == 0
    return value == 1, value % 16 == 0, -(2**31) <= value < 2**31


def launch(kernel, blocks: int, args: tuple, constexprs: dict, **options) -> None:
    """kernel[(blocks,)](*args, **constexprs, **options), with `args` the kernel's leading non-constexpr
    parameters in order and `constexprs` the rest, by name, in the kernel's order."""
    if interpreted():
        kernel[(blocks,)](*args, **constexprs, **options)
        return
    device = driver.active.get_current_device()
    key = (kernel, device, *map(_argument_class, args), *constexprs.items(), *options.items())
    compiled = _compiled.get(key)
    if compiled is None:
        _compiled[key] = kernel[(blocks,)](*args, **constexprs, **options)
        return
    stream = driver.active.get_current_stream(device)
    args = (*args, *constexprs.values())
    compiled.run(
        blocks, 1, 1, stream, compiled.function, compiled.packed_metadata,
        compiled.launch_metadata((blocks,), stream, *args),
        knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook, *args,
    )
