"""Publishing an export on the Hugging Face Hub: the model card, the repo (created before
anything is converted, so that a missing token or network fails fast) and the upload."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from titan.convert.common import (
    ConvertError,
    Log,
    TransferError,
    first_line,
    print_line,
)
from titan.models.llama import ModelArgs


def model_card(
    args: ModelArgs,
    title: str,
    step: int | None,
    job: dict | None,
    source: Path,
    dtype: str,
) -> str:
    """A README.md for the Hub: what the model is, the recipe and step it comes from."""
    job_section = (job or {}).get("job", {})
    training = (job or {}).get("training", {})
    recipe = job_section.get("config_file") or "unknown"
    seq_len = f"{training['seq_len']} tokens" if training.get("seq_len") else "unknown"
    rows = [
        ("dim", args.dim),
        ("layers", args.n_layers),
        ("attention heads (kv heads)", f"{args.n_heads} ({args.n_kv_heads})"),
        ("FFN hidden", args.ffn_hidden_dim),
        ("vocabulary", args.vocab_size),
        ("context (max_position_embeddings)", args.max_seq_len),
        (
            "RoPE",
            f"theta {args.rope_theta:g}" + (", Llama-3.1 scaling" if args.use_scaled_rope else ""),
        ),
        ("dtype", dtype),
    ]
    lines = [
        "---",
        "library_name: transformers",
        "tags:",
        "- llama",
        "- titan",
        "- neuroscience",
        "---",
        "",
        f"# {title}",
        "",
        "A Llama-3.1-style decoder trained with titan (PyTorch FSDP2) and exported from a "
        "Distributed Checkpoint with `dcp_to_llama.py`.",
        "",
        f"- recipe: `{recipe}`"
        + (f" ({job_section['description']})" if job_section.get("description") else ""),
        f"- step: {step if step is not None else 'unknown'}",
        f"- dataset: {training.get('dataset', 'unknown')}",
        f"- training sequence length: {seq_len}",
        f"- source checkpoint: `{source.parent.name}/{source.name}`",
        "",
        "| | |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in rows],
        "",
    ]
    if args.vocab_size == 256:
        lines += [
            "Tokens are spike counts: 0..254 are counts (clipped at 254) and 255 opens each "
            "20 ms time bin, followed by one count per neuron.",
            "",
        ]
    lines += [
        "```python",
        "from transformers import AutoModelForCausalLM",
        f'model = AutoModelForCausalLM.from_pretrained("{title}")',
        "```",
        "",
    ]
    return "\n".join(lines)


def create_hub_repo(repo_name: str, private: bool) -> tuple[Any, str]:
    """(HfApi, repo id) for `repo_name`, created if needed; called before anything is
    written, so that a missing token or network fails fast and leaves nothing behind.
    ConvertError on any failure."""
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_name)
    except HFValidationError as e:
        reason = str(e).splitlines()[0].split(". Use")[0]  # drop advice about repo_type
        raise ConvertError(f"--hf_repo_name {repo_name!r} is not a Hub repo id: {reason}") from None
    token = get_token()
    if not token:
        raise ConvertError(
            "--push_to_hub: no Hugging Face token found; run `hf auth login` or set HF_TOKEN"
        )
    api = HfApi(token=token)
    try:
        repo = api.create_repo(repo_name, private=private, exist_ok=True, repo_type="model")
        repo_id = getattr(repo, "repo_id", repo_name)
        # create_repo leaves an existing repo as it is, public or not
        public = private and not api.repo_info(repo_id, repo_type="model").private
    except Exception as e:  # network, auth and HTTP errors have many types
        raise TransferError(
            f"--push_to_hub: cannot create the Hub repo {repo_name}: {first_line(e)}"
        ) from None
    if public:
        raise ConvertError(
            f"--private: the Hub repo {repo_id} exists and is public; make it private in its "
            "settings on the Hub, or push without --private"
        )
    return api, repo_id


_WEIGHT_FILES = ("*.safetensors", "model.safetensors.index.json", "original/*")


def upload_to_hub(api: Any, folder: Path, repo_id: str, log: Log = print_line) -> None:
    """Upload `folder` to the Hub model repo `repo_id`; ConvertError on any failure."""
    log(f"  uploading {folder} to https://huggingface.co/{repo_id} ...")
    try:
        api.upload_folder(
            folder_path=str(folder),
            repo_id=repo_id,
            repo_type="model",
            commit_message="Upload model exported by titan's dcp_to_llama.py",
            # weights of an earlier push that this export does not overwrite (another
            # shard count, a Meta copy) would otherwise stay beside the new ones
            delete_patterns=[*_WEIGHT_FILES],
        )
    except Exception as e:  # network, auth and HTTP errors have many types
        raise TransferError(f"--push_to_hub: upload to {repo_id} failed: {first_line(e)}") from None
