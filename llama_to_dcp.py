"""Convert Llama weights (Meta or Hugging Face layout) into a DCP directory for training.

    python llama_to_dcp.py --input_dir Llama-3.1-8B --output_dir llama8b_dcp [--flavor 8B]

Then train from it with `--checkpoint.initial_load_path llama8b_dcp`. By default the
embedding and output layers are dropped when the target vocabulary (--vocab_size, 256)
differs from the source's. `python llama_to_dcp.py --help` lists the options; the logic
lives in titan/convert/.
"""

import sys

from titan.cli import at_least
from titan.convert import llama_to_dcp
from titan.convert.cli import parser, run


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit status."""
    p = parser(
        "llama_to_dcp.py",
        "Convert Llama weights (Meta or Hugging Face layout) into a DCP directory "
        "that training loads with --checkpoint.initial_load_path.",
        input_help="Meta (params.json + consolidated.*.pth) or HF (config.json + "
        "*.safetensors) checkpoint; an HF repo's original/ works too",
        flavor_help="refuse unless the weights have this titan flavor's architecture",
    )
    p.add_argument(
        "--source_format",
        choices=["auto", "meta", "hf"],
        default="auto",
        help="layout of --input_dir (default: detect)",
    )
    p.add_argument(
        "--vocab_size",
        type=at_least(256),
        default=256,
        help="target vocabulary; embedding and output are dropped when the source's "
        "differs (default 256, spike tokens)",
    )
    p.add_argument(
        "--keep_embeddings",
        action="store_true",
        help="keep tok_embeddings and output even when the vocabularies differ",
    )
    return run(llama_to_dcp, **vars(p.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
