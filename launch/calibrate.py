"""torchrun entry point: `torchrun --nproc-per-node 4 launch/calibrate.py --model tiny-qwen3-moe --recipe
nvfp4_default-fp8_cast_kv --tp 2 --ep 2 --out out/tiny` (the same as `-m dist_quant.cli calibrate ...`)."""

import sys

from dist_quant.cli import main

if __name__ == "__main__":
    sys.exit(main(["calibrate", *sys.argv[1:]]))
