#!/usr/bin/env bash
# Download, on a machine with PyPI access, the wheels the GPU machines lack (Python 3.12 there), into .whl/:
# ModelOpt 0.47 (the peer of the kernel benchmarks) with the set that imports on that image, and megatron-core.
# On the GPU machine: python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
#                     export PYTHONPATH=/tmp/site
set -euo pipefail
cd "$(dirname "$0")/.."
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
    -d .whl nvidia-modelopt==0.47.0 pydantic==2.14.3 pydantic-core==2.50.4 annotated-types==0.8.0 \
    typing-inspection==0.4.5 typing-extensions==4.16.0 omegaconf==2.4.0 antlr4-python3-runtime==4.13.2 \
    "pulp==3.3.2" megatron-core==0.19.2
