"""Checkpoint conversion between Llama weights and titan's DCP checkpoints.

Two directions, each a thin command at the repository root:

    python llama_to_dcp.py --input_dir Llama-3.1-8B --output_dir llama8b_dcp
    python dcp_to_llama.py --input_dir outputs/checkpoint/step-1000 --output_dir export \
        --format hf --dtype bfloat16 [--hf_repo_name USER/NAME --push_to_hub]

Memory stays bounded by a few tensors, whatever the model size: sources are read tensor
by tensor (Meta's `consolidated.NN.pth` through memory maps, HF's safetensors with
`safe_open`), DCP is written one tensor at a time as the writer asks and read back in
groups of bounded size, and exports are streamed into their files.

Modules: `sources` (reading Meta / HF weights), `to_dcp` (llama_to_dcp), `from_dcp`
(dcp_to_llama and reading DCP directories), `writers` (safetensors shards, Meta's .pth),
`hub` (model card and upload), `output` (the output folder and its markers), `cli` (the
scripts' shared options), `common` (errors, memory budgets, messages, progress).
Every user error raises `ConvertError`, which the scripts print as one line.
"""

from titan.convert.common import DTYPES, ConvertError
from titan.convert.from_dcp import (
    dcp_model_args,
    dcp_to_llama,
    find_job_config,
    read_dcp_model_groups,
    read_dcp_model_metadata,
    step_architecture,
)
from titan.convert.hub import create_hub_repo, model_card, upload_to_hub
from titan.convert.output import prepare_output
from titan.convert.sources import HFSource, MetaSource, detect_layout
from titan.convert.to_dcp import check_flavor, llama_to_dcp
from titan.convert.writers import MetaCheckpointWriter, SafetensorsShardWriter

__all__ = [
    "DTYPES",
    "ConvertError",
    "HFSource",
    "MetaCheckpointWriter",
    "MetaSource",
    "SafetensorsShardWriter",
    "check_flavor",
    "create_hub_repo",
    "dcp_model_args",
    "dcp_to_llama",
    "detect_layout",
    "find_job_config",
    "llama_to_dcp",
    "model_card",
    "prepare_output",
    "read_dcp_model_groups",
    "read_dcp_model_metadata",
    "step_architecture",
    "upload_to_hub",
]
