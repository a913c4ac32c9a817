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


class Launcher:
    """`Launcher(kernel, constexprs, **options)(grid, *args)` = `kernel[grid](*args, **constexprs, **options)`, `grid`
    a program count or a (programs, rows of programs) pair, `args` being the kernel's leading non-constexpr
    parameters in order and `constexprs` the rest, in order."""

    def __init__(self, kernel, constexprs: dict, **options):
        self.kernel, self.constexprs, self.options = kernel, constexprs, options
        self.constexpr_values = tuple(constexprs.values())
        self.compiled: dict[tuple, object] = {}
        self.current_device = self.current_stream = None  # the GPU driver's, looked up at the first launch

    def __call__(self, grid: int | tuple[int, int], *args) -> None:
        grid = (grid, 1) if isinstance(grid, int) else grid
        if INTERPRETED:
            self.kernel[grid](*args, **self.constexprs, **self.options)
            return
        if self.current_device is None:
            active = driver.active
            self.current_device, self.current_stream = active.get_current_device, active.get_current_stream
        device = self.current_device()
        key, values = [device], []
        for arg in args:
            if isinstance(arg, torch.Tensor):
                address = arg.data_ptr()
                key.append((arg.dtype, address % 16 == 0))
                values.append(address)
            else:
                key.append((arg == 1, arg % 16 == 0, -(2**31) <= arg < 2**31))
                values.append(arg)
        compiled = self.compiled.get(key := tuple(key))
        if compiled is None:
            self.compiled[key] = self.kernel[grid](*args, **self.constexprs, **self.options)
            return
        stream = self.current_stream(device)
        values += self.constexpr_values
        enter, leave = _hook(knobs.runtime.launch_enter_hook), _hook(knobs.runtime.launch_exit_hook)
        metadata = None if enter is None else compiled.launch_metadata(grid, stream, *values)
        compiled.run(*grid, 1, stream, compiled.function, compiled.packed_metadata, metadata, enter, leave, *values)


def _hook(hook):
    """A launch hook, None where it would call nothing: Triton >= 3.5 keeps its hooks as chains, empty unless a
    profiler added one, and calling an empty chain (with the launch metadata it is handed) costs microseconds
    per launch."""
    return hook if getattr(hook, "calls", hook) else None


def cdiv(n: int, d: int) -> int:
    """n / d rounded up (`triton.cdiv`, which Triton >= 3.5 makes a constexpr function, a few Python calls deep,
    on the host path of every launch)."""
    return -(-n // d)


def next_power_of_2(n: int) -> int:
    """The least power of two >= n >= 1 (`triton.next_power_of_2`, as for `cdiv`)."""
    return 1 << (n - 1).bit_length()
