"""The kernel launcher's host helpers (`kernels.launch`): the grid arithmetic is Triton's, and launch hooks are
passed on exactly when they would call something."""

import triton
from triton.knobs import HookChain

from dist_quant.kernels.launch import _hook, cdiv, next_power_of_2


def test_grid_arithmetic_is_tritons():
    for n in range(0, 300):
        for d in (1, 2, 3, 16, 64, 129):
            assert cdiv(n, d) == triton.cdiv(n, d)
    for n in list(range(1, 300)) + [2**31 - 1, 2**31, 2**31 + 1, 65535]:
        assert next_power_of_2(n) == triton.next_power_of_2(n)


def test_launch_hooks_are_passed_only_where_they_call_something():
    chain = HookChain()
    assert _hook(chain) is None and _hook(None) is None
    chain.add(print)
    assert _hook(chain) is chain
    assert _hook(print) is print  # Triton before 3.5: a plain callable or None
