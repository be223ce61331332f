"""Sample spike trains from a trained model (KV-cache decoding) into an .npz and a PNG.

    python generate.py --checkpoint outputs/debug_model/checkpoint/step-100 \
        --dataset synthetic --row 0 --prompt_bins 20 --bins 100 --out samples/row0.npz

`python generate.py --help` lists the options; the logic lives in titan/generate.py.
"""

import sys

from titan.generate import main

if __name__ == "__main__":
    sys.exit(main())
