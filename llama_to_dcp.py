"""Convert Llama weights (Meta or Hugging Face layout) into a DCP directory for training.

    python llama_to_dcp.py --input_dir Llama-3.1-8B --output_dir llama8b_dcp [--flavor 8B]

Then train from it with `--checkpoint.initial_load_path llama8b_dcp`. By default the
embedding and output layers are dropped when the target vocabulary (--vocab_size, 256)
differs from the source's. `python llama_to_dcp.py --help` lists the options; the logic
lives in titan/convert.py.
"""

import sys

from titan.convert import llama_to_dcp_main

if __name__ == "__main__":
    sys.exit(llama_to_dcp_main())
