"""Export the model of a DCP checkpoint to Meta and/or Hugging Face layout (and the Hub).

    python dcp_to_llama.py --input_dir outputs/checkpoint/step-1000 --output_dir export \
        --format hf --dtype bfloat16 [--hf_repo_name USER/NAME --push_to_hub [--private]]

Reads only the model tensors (never the optimizer state). `python dcp_to_llama.py --help`
lists the options; the logic lives in titan/convert/.
"""

import sys

from titan.checkpoint import MARKER
from titan.cli import at_least
from titan.convert import dcp_to_llama
from titan.convert.cli import parser, run, size


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit status."""
    p = parser(
        "dcp_to_llama.py",
        "Export the model weights of a DCP step directory (full training "
        "checkpoint or model-only export) to Meta and/or Hugging Face layout.",
        input_help="DCP step directory (…/step-N)",
        flavor_help="architecture, if neither params.json nor the run's config.toml says "
        "(refused when it disagrees with params.json; wins over a config.toml)",
    )
    p.add_argument(
        "--format",
        dest="fmt",
        choices=["meta", "hf", "both"],
        default="hf",
        help="hf: sharded safetensors + config.json; meta: consolidated.00.pth + "
        "params.json; both: HF with Meta's files under original/ (default hf)",
    )
    p.add_argument(
        "--max_seq_len",
        type=at_least(1),
        default=None,
        help="max_position_embeddings in config.json (default: the run's seq_len, else "
        "131072; with scaled RoPE, raised above its original context as transformers wants)",
    )
    p.add_argument(
        "--max_shard_size",
        type=size,
        default="5GB",
        help="largest safetensors shard (default 5GB)",
    )
    p.add_argument("--hf_repo_name", default=None, help="Hub repo USER/NAME (model card title)")
    p.add_argument("--push_to_hub", action="store_true", help="upload the HF folder to the Hub")
    p.add_argument("--private", action="store_true", help="create the Hub repo as private")
    p.add_argument(
        "--allow_incomplete",
        action="store_true",
        help=f"read a directory without the {MARKER} marker",
    )
    return run(dcp_to_llama, **vars(p.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
