"""Export the model of a DCP checkpoint to Meta and/or Hugging Face layout (and the Hub).

    python dcp_to_llama.py --input_dir outputs/checkpoint/step-1000 --output_dir export \
        --format hf --dtype bfloat16 [--hf_repo_name USER/NAME --push_to_hub [--private]]

Reads only the model tensors (never the optimizer state). `python dcp_to_llama.py --help`
lists the options; the logic lives in titan/convert.py.
"""

import sys

from titan.convert import dcp_to_llama_main

if __name__ == "__main__":
    sys.exit(dcp_to_llama_main())
