"""Converter tests (issue 5): `llama_to_dcp.py` and `dcp_to_llama.py` / titan/convert/.

1. A tiny `transformers.LlamaForCausalLM` (GQA, Llama-3.1 RoPE scaling, sharded
   safetensors) -> DCP keeping the vocabulary -> our model's logits match within 1e-4
   -> `--format hf` -> `AutoModelForCausalLM.from_pretrained` matches again.
2. A Meta checkpoint split in 2 model-parallel shards (Llama-3 and Llama-2 embedding
   splits) converts to the same DCP tensors as the unsplit one; DCP -> Meta is exact;
   `--format both` and `--dtype` work.
3. A 512-token HF model converted with the embeddings dropped initializes the scaled-down
   lang-primate recipe through `initial_load_path` (2 ranks); all blocks start from the
   converted weights and train; the run's own checkpoint exports back to HF.
4. Export of a full training checkpoint requests only `model.*` items from the reader,
   and still works when the optimizer's files are deleted.
5. The push path up to the upload call (create_repo/upload_folder stubbed), no token and
   no network (neither leaves an output folder); every bad input gives a non-zero exit and
   one line, no traceback.
6. An export's max_position_embeddings is above scaled RoPE's original context, so that
   transformers loads it without a warning; the rerun after a conversion or export killed
   mid-way says the output is partial, and --overwrite replaces it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed.checkpoint as dcp
from conftest import ROOT, run_train, tiny_hf_config
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter

from dcp_to_llama import main as dcp_to_llama_main
from llama_to_dcp import main as llama_to_dcp_main
from titan import convert
from titan.checkpoint import storage
from titan.convert import common
from titan.models import keymap
from titan.models.llama import ModelArgs, Transformer, build_model_args

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
TOKENS = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    """A tiny random LlamaForCausalLM saved in 3 safetensors shards with an index."""
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(tiny_hf_config()).float().eval()
    folder = tmp_path_factory.mktemp("hf")
    model.save_pretrained(folder, max_shard_size="200KB")
    assert (folder / "model.safetensors.index.json").is_file()
    return folder


def _hf_logits(folder: Path) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        return model.eval()(TOKENS).logits


def _dcp_model_tensors(folder: Path) -> dict[str, torch.Tensor]:
    stored = convert.read_dcp_model_metadata(folder)
    request = {"model": {k: torch.empty(s, dtype=d) for k, (s, d) in stored.items()}}
    dcp.load(request, storage_reader=FileSystemReader(str(folder)), no_dist=True)
    return request["model"]


def _ok(rc: int, capsys) -> str:
    out = capsys.readouterr()
    assert rc == 0, out.err
    return out.out


# ----------------------------------------------------------------------------- 1


def test_hf_to_dcp_to_hf_logits(hf_dir, tmp_path, capsys):
    expected = _hf_logits(hf_dir)
    argv = ["--input_dir", str(hf_dir), "--output_dir", str(tmp_path / "d")]
    out = _ok(llama_to_dcp_main(argv), capsys)
    assert "llama_to_dcp: 21 tensors" in out.splitlines()[-1]  # summary line
    assert (tmp_path / "d" / ".complete").is_file()

    params = json.loads((tmp_path / "d" / "params.json").read_text())
    args = keymap.args_from_meta_params(params)
    assert args.rope_original_context == 16 and args.n_kv_heads == 2
    model = Transformer(args).eval()
    model.load_state_dict(_dcp_model_tensors(tmp_path / "d"), strict=True)
    with torch.no_grad():
        assert (model(TOKENS) - expected).abs().max() < 1e-4

    argv = ["--input_dir", str(tmp_path / "d"), "--output_dir", str(tmp_path / "hf"), "--format",
            "hf", "--max_shard_size", "300KB"]  # fmt: skip
    out = _ok(dcp_to_llama_main(argv), capsys)
    assert "dcp_to_llama: 21 tensors, 131,392 parameters" in out
    files = sorted(p.name for p in (tmp_path / "hf").iterdir())
    assert files == [
        "README.md", "config.json", "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors", "model.safetensors.index.json",
    ]  # fmt: skip
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["rope_scaling"]["rope_type"] == "llama3"
    assert config["rope_parameters"]["original_max_position_embeddings"] == 16
    assert (_hf_logits(tmp_path / "hf") - expected).abs().max() < 1e-4


def test_tied_hf_embeddings_and_bf16(tmp_path, capsys):
    torch.manual_seed(1)
    hf = transformers.LlamaForCausalLM(tiny_hf_config(tie_word_embeddings=True)).eval()
    hf.to(torch.bfloat16).save_pretrained(tmp_path / "hf")
    argv = ["--input_dir", str(tmp_path / "hf"), "--output_dir", str(tmp_path / "d"),
            "--dtype", "float32"]  # fmt: skip
    _ok(llama_to_dcp_main(argv), capsys)
    tensors = _dcp_model_tensors(tmp_path / "d")
    assert tensors["output.weight"].dtype == torch.float32
    assert torch.equal(tensors["output.weight"], tensors["tok_embeddings.weight"])
    assert torch.equal(tensors["norm.weight"], hf.model.norm.weight.float())


# ----------------------------------------------------------------------------- 2

META_ARGS = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=320, multiple_of=32)
DIM0 = ("wq", "wk", "wv", "w1", "w3", "output")


def _split(sd: dict[str, torch.Tensor], n: int, embedding_dim: int) -> list[dict]:
    shards: list[dict] = [{} for _ in range(n)]
    for name, t in sd.items():
        proj = name.split(".")[-2]
        if name == "tok_embeddings.weight":
            parts = t.chunk(n, dim=embedding_dim)
        elif proj in DIM0:
            parts = t.chunk(n, dim=0)
        elif proj in ("wo", "w2"):
            parts = t.chunk(n, dim=1)
        else:
            parts = [t] * n  # norms are replicated
        for shard, part in zip(shards, parts, strict=True):
            shard[name] = part.clone()
    return shards


@pytest.fixture(scope="module")
def meta_dirs(tmp_path_factory) -> tuple[dict[str, torch.Tensor], dict[str, Path]]:
    """The same bf16 weights as 1 shard, 2 shards, and 2 shards with Llama-2's embedding."""
    model = Transformer(META_ARGS)
    model.init_weights(seed=5)
    sd = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    params = keymap.meta_params_from_args(META_ARGS)
    root = tmp_path_factory.mktemp("meta")
    dirs = {}
    for kind, shards in {
        "one": [sd],
        "two": _split(sd, 2, embedding_dim=0),
        "two_llama2": _split(sd, 2, embedding_dim=1),
    }.items():
        folder = root / kind / "original"  # as in an HF repo: found by detection
        folder.mkdir(parents=True)
        (folder / "params.json").write_text(json.dumps(params))
        for i, shard in enumerate(shards):
            torch.save(shard, folder / f"consolidated.{i:02d}.pth")
        dirs[kind] = folder.parent
    return sd, dirs


def test_meta_shards_merge_and_round_trip(meta_dirs, tmp_path, capsys, monkeypatch):
    sd, dirs = meta_dirs
    # Tiny budgets, so that row chunks, remapping and read groups are all exercised.
    monkeypatch.setattr(common, "CHUNK_BYTES", 4000)
    monkeypatch.setattr(common, "MAP_BYTES", 16000)
    monkeypatch.setattr(common, "GROUP_BYTES", 20000)
    converted = {}
    for kind, folder in dirs.items():
        argv = ["--input_dir", str(folder), "--output_dir", str(tmp_path / kind),
                "--vocab_size", "320"]  # fmt: skip
        out = _ok(llama_to_dcp_main(argv), capsys)
        assert f"meta checkpoint in {folder / 'original'}" in out
        converted[kind] = _dcp_model_tensors(tmp_path / kind)
    for kind in ("two", "two_llama2"):
        assert converted[kind].keys() == sd.keys()
        for name in sd:
            assert torch.equal(converted[kind][name], converted["one"][name]), (kind, name)
    for name in sd:
        assert converted["one"][name].dtype == torch.bfloat16
        assert torch.equal(converted["one"][name], sd[name]), name

    # DCP -> Meta is exact, and its params.json is the original's.
    argv = ["--input_dir", str(tmp_path / "two"), "--output_dir", str(tmp_path / "m"),
            "--format", "meta"]  # fmt: skip
    _ok(dcp_to_llama_main(argv), capsys)
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [
        "consolidated.00.pth",
        "params.json",
    ]
    back = torch.load(tmp_path / "m" / "consolidated.00.pth", weights_only=True)
    assert list(back) == list(sd)
    assert all(torch.equal(back[k], sd[k]) and back[k].dtype == sd[k].dtype for k in sd)
    params = json.loads((dirs["one"] / "original" / "params.json").read_text())
    assert json.loads((tmp_path / "m" / "params.json").read_text()) == params

    # --format both: HF at the top, Meta under original/ (the Hub's layout); --dtype.
    argv = ["--input_dir", str(tmp_path / "two"), "--output_dir", str(tmp_path / "b"),
            "--format", "both", "--dtype", "float32"]  # fmt: skip
    _ok(dcp_to_llama_main(argv), capsys)
    back = torch.load(tmp_path / "b" / "original" / "consolidated.00.pth", weights_only=True)
    assert all(torch.equal(back[k], sd[k].float()) for k in sd)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "b")
    assert hf.dtype == torch.float32 and hf.config.vocab_size == 320
    ours = Transformer(dataclasses.replace(META_ARGS, max_seq_len=64)).eval()
    ours.load_state_dict({k: v.float() for k, v in sd.items()})
    tokens = TOKENS[:, :32]
    with torch.no_grad():
        assert (hf.eval()(tokens).logits - ours(tokens)).abs().max() < 1e-4


# ----------------------------------------------------------------------------- 3


def test_dropped_embeddings_initialize_lang_primate_recipe(tmp_path, synthetic_dir, capsys):
    debug = build_model_args("debugmodel", vocab_size=512, seq_len=128)
    cfg = tiny_hf_config(
        hidden_size=debug.dim,
        intermediate_size=debug.ffn_hidden_dim,
        num_hidden_layers=debug.n_layers,
        num_attention_heads=debug.n_heads,
        num_key_value_heads=debug.n_kv_heads,
        vocab_size=512,
        max_position_embeddings=131072,
        initializer_range=0.02,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    )
    torch.manual_seed(2)
    source = transformers.LlamaForCausalLM(cfg).float()
    source.save_pretrained(tmp_path / "hf")
    argv = ["--input_dir", str(tmp_path / "hf"), "--output_dir", str(tmp_path / "dcp"),
            "--flavor", "debugmodel"]  # fmt: skip
    out = _ok(llama_to_dcp_main(argv), capsys)
    assert "dropping tok_embeddings.weight and output.weight" in out
    assert (
        "model.tok_embeddings.weight"
        not in FileSystemReader(str(tmp_path / "dcp")).read_metadata().state_dict_metadata
    )

    dump = tmp_path / "run"
    result = run_train(
        [
            "--job.config_file=train_configs/lang_primate_8b_131k.toml",
            f"--job.dump_folder={dump}",
            f"--checkpoint.initial_load_path={tmp_path / 'dcp'}",
            "--model.flavor=debugmodel",
            "--model.attn_impl=sdpa",
            "--training.dataset=synthetic",
            f"--training.dataset_path={synthetic_dir}",
            "--training.seq_len=64",
            "--training.batch_size=2",
            "--training.steps=2",
            "--training.warmup_steps=1",
            "--training.no_compile",
            "--training.mixed_precision_param=float32",
            "--optimizer.lr=1e-6",
            "--checkpoint.async_mode=disabled",
            "--metrics.no_enable_tensorboard",
            "--metrics.log_freq=1",
        ],
        nproc=2,
    )
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    assert "Initialized 37 of 39 model tensors" in log
    assert "tok_embeddings.weight (absent), output.weight (absent)" in log

    # The run's own full checkpoint (optimizer and all) exports to HF; the architecture
    # comes from the run's config.toml. Every block equals the converted weights up to
    # two tiny AdamW steps, and has moved (it was trained).
    step_dir = dump / "checkpoint" / "step-2"
    argv = ["--input_dir", str(step_dir), "--output_dir", str(tmp_path / "x")]
    out = _ok(dcp_to_llama_main(argv), capsys)
    assert f"(from {dump / 'config.toml'} (flavor debugmodel))" in out
    card = (tmp_path / "x" / "README.md").read_text()
    assert "step: 2" in card and "lang_primate_8b_131k.toml" in card
    trained = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "x").state_dict()
    original = source.state_dict()
    for name, tensor in trained.items():
        if "embed_tokens" in name or "lm_head" in name:
            assert tensor.shape[0] == 256
            continue
        assert torch.allclose(tensor, original[name], atol=1e-5), name
        if "layernorm" not in name and "model.norm" not in name:
            assert not torch.equal(tensor, original[name]), f"{name} was not trained"


# ----------------------------------------------------------------------------- 4


def _training_checkpoint(folder: Path, single_file: bool) -> dict[str, torch.Tensor]:
    """A full training checkpoint of the debug flavor, with optimizer state, laid out as
    titan's trainer writes it, plus its run's config.toml two levels up."""
    args = build_model_args("debugmodel", vocab_size=256, seq_len=64)
    model = Transformer(args)
    model.init_weights(seed=1)
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    optim = {
        "state": {
            k: {
                "exp_avg": torch.randn_like(v),
                "exp_avg_sq": torch.rand_like(v),
                "step": torch.tensor(7.0),
            }
            for k, v in sd.items()
        },  # fmt: skip
        "param_groups": [{"lr": 1e-4, "params": list(sd)}],
    }
    state = {
        "model": sd,
        "optimizer": optim,
        "lr_scheduler": {"last_epoch": 7},
        "train_state": {"step": torch.tensor(7)},
        "dataloader": {"dp_rank_0": b"position"},
    }
    writer = FileSystemWriter(str(folder), single_file_per_rank=single_file)
    dcp.save(state, storage_writer=writer, no_dist=True)
    names = sorted(p.name for p in folder.glob("*.distcp"))
    storage.complete(folder, {"step": 7, "kind": "full"}, storage.checksums(folder, names))
    (folder.parent.parent / "config.toml").write_text(
        '[job]\nconfig_file = "train_configs/debug_model.toml"\n'
        '[model]\nflavor = "debugmodel"\n[training]\nseq_len = 64\ndataset = "synthetic"\n'
    )
    return sd


def test_export_never_reads_optimizer(tmp_path, capsys, monkeypatch):
    step_dir = tmp_path / "dump" / "checkpoint" / "step-7"
    sd = _training_checkpoint(step_dir, single_file=True)
    requested: list[str] = []
    original = FileSystemReader.read_data

    def recording(self, plan, planner):
        requested.extend(item.storage_index.fqn for item in plan.items)
        return original(self, plan, planner)

    monkeypatch.setattr(FileSystemReader, "read_data", recording)
    argv = ["--input_dir", str(step_dir), "--output_dir", str(tmp_path / "m"), "--format", "meta"]
    _ok(dcp_to_llama_main(argv), capsys)
    assert sorted(requested) == sorted(f"model.{k}" for k in sd)
    back = torch.load(tmp_path / "m" / "consolidated.00.pth", weights_only=True)
    assert all(torch.equal(back[k], sd[k]) for k in sd)

    # One file per item: delete every file that holds optimizer or other non-model state.
    step_dir = tmp_path / "dump2" / "checkpoint" / "step-7"
    _training_checkpoint(step_dir, single_file=False)
    metadata = FileSystemReader(str(step_dir)).read_metadata()
    for index, info in metadata.storage_data.items():
        if not index.fqn.startswith("model."):
            (step_dir / info.relative_path).unlink(missing_ok=True)
    argv = ["--input_dir", str(step_dir), "--output_dir", str(tmp_path / "h")]
    _ok(dcp_to_llama_main(argv), capsys)
    card = (tmp_path / "h" / "README.md").read_text()
    assert "step: 7" in card and "train_configs/debug_model.toml" in card


# ----------------------------------------------------------------------------- 5


@pytest.fixture(scope="module")
def dcp_dir(hf_dir, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("dcp") / "converted"
    assert llama_to_dcp_main(["--input_dir", str(hf_dir), "--output_dir", str(folder)]) == 0
    return folder


def test_push_to_hub_up_to_the_upload_call(dcp_dir, tmp_path, capsys, monkeypatch):
    import huggingface_hub

    calls = {}

    def create_repo(self, repo_id, **kwargs):
        calls["create"] = (repo_id, kwargs)
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, **kwargs):
        calls["upload"] = kwargs
        calls["files"] = sorted(p.name for p in Path(kwargs["folder_path"]).iterdir())

    public = {"someone/public-one"}

    def repo_info(self, repo_id, **kwargs):
        return SimpleNamespace(private=repo_id not in public)

    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    monkeypatch.setattr(huggingface_hub.HfApi, "repo_info", repo_info)
    argv = ["--input_dir", str(dcp_dir), "--output_dir", str(tmp_path / "o"),
            "--hf_repo_name", "someone/tiny-neuro", "--push_to_hub", "--private"]  # fmt: skip
    out = _ok(dcp_to_llama_main(argv), capsys)
    assert calls["create"] == (
        "someone/tiny-neuro",
        {"private": True, "exist_ok": True, "repo_type": "model"},
    )
    assert calls["upload"]["repo_id"] == "someone/tiny-neuro"
    assert calls["files"] == ["README.md", "config.json", "model.safetensors"]
    # an earlier push's weights with other names (more shards, original/) are removed
    assert {"*.safetensors", "original/*"} <= set(calls["upload"]["delete_patterns"])
    assert "pushed to https://huggingface.co/someone/tiny-neuro" in out
    card = (tmp_path / "o" / "README.md").read_text()
    assert "# someone/tiny-neuro" in card and "library_name: transformers" in card

    # --private never uploads into an existing public repo; a malformed name is refused
    # before anything is created
    for name, words in [
        ("someone/public-one", "exists and is public"),
        ("a/b/c", "is not a Hub repo id"),
    ]:
        calls.clear()
        argv = ["--input_dir", str(dcp_dir), "--output_dir", str(tmp_path / name),
                "--hf_repo_name", name, "--push_to_hub", "--private"]  # fmt: skip
        assert dcp_to_llama_main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0], err
        assert "upload" not in calls and not (tmp_path / name).exists()


def _cli(script: str, *argv: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / script), *argv],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
        timeout=120,
    )


def _one_line_error(result: subprocess.CompletedProcess, *words: str) -> None:
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    for word in words:
        assert word in lines[0], lines[0]


def test_push_without_token_or_network(dcp_dir, tmp_path):
    env = {k: "" for k in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    no_token = _cli(
        "dcp_to_llama.py", "--input_dir", str(dcp_dir), "--output_dir", str(tmp_path / "a"),
        "--hf_repo_name", "someone/x", "--push_to_hub",
        env={**env, "HF_HOME": str(tmp_path / "hf_home")},
    )  # fmt: skip
    _one_line_error(no_token, "no Hugging Face token")
    assert not (tmp_path / "a").exists()  # nothing is created before the token check
    offline = _cli(
        "dcp_to_llama.py", "--input_dir", str(dcp_dir), "--output_dir", str(tmp_path / "b"),
        "--hf_repo_name", "someone/x", "--push_to_hub",
        env={"HF_TOKEN": "hf_test_token", "HF_ENDPOINT": "http://127.0.0.1:9"},
    )  # fmt: skip
    _one_line_error(offline, "cannot create the Hub repo someone/x")
    assert not (tmp_path / "b").exists()  # nor before the repo is created


def test_cli_bad_input_exits_with_one_line(tmp_path):
    _one_line_error(
        _cli("llama_to_dcp.py", "--input_dir", str(tmp_path / "nope"), "--output_dir", "x"),
        "no such directory",
    )
    (tmp_path / "empty").mkdir()
    _one_line_error(
        _cli("dcp_to_llama.py", "--input_dir", str(tmp_path / "empty"), "--output_dir", "x"),
        "no .metadata",
    )


def _bad_llama_inputs(root: Path, hf_dir: Path) -> dict[str, tuple[list[str], str]]:
    """Name -> (llama_to_dcp argv, words the error line must contain)."""
    import shutil

    def copy(name: str) -> Path:
        return Path(shutil.copytree(hf_dir, root / name))

    (root / "unknown").mkdir(parents=True)
    (root / "unknown" / "weights.bin").write_bytes(b"x")
    bad_json = copy("bad_json")
    (bad_json / "config.json").write_text("{not json")
    wrong_shape = copy("wrong_shape")
    config = json.loads((wrong_shape / "config.json").read_text())
    (wrong_shape / "config.json").write_text(json.dumps(config | {"intermediate_size": 256}))
    truncated = copy("truncated")
    shard = sorted(truncated.glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:100])
    missing = copy("missing")
    sorted(missing.glob("*.safetensors"))[-1].unlink()
    meta = root / "meta_bad"
    meta.mkdir()
    (meta / "params.json").write_text(json.dumps(keymap.meta_params_from_args(META_ARGS)))
    (meta / "consolidated.00.pth").write_bytes(b"not a zip file")
    out_busy = root / "busy"
    out_busy.mkdir()
    (out_busy / "notes.txt").write_text("mine")
    malformed = {}
    for name, change in {
        "no_heads": {"num_attention_heads": 0},
        "rope_string": {"rope_scaling": "llama3", "rope_parameters": None},
        "vocab_null": {"vocab_size": None},
        "eps_text": {"rms_norm_eps": "1e-5"},
        "rope_list": {"rope_parameters": [1, 2]},
        "odd_head_dim": {"num_attention_heads": 64, "num_key_value_heads": 64, "head_dim": 1},
    }.items():
        folder = malformed[name] = copy(name)
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps(config | change))
    listed_map = copy("listed_map")
    (listed_map / "model.safetensors.index.json").write_text('{"weight_map": ["a"]}')
    (root / "a_file").write_text("")
    twice = copy("twice")  # without an index, a tensor in two files
    (twice / "model.safetensors.index.json").unlink()
    from safetensors.torch import save_file

    save_file({"model.norm.weight": torch.ones(64)}, str(twice / "zz-extra.safetensors"))
    index = json.loads((hf_dir / "model.safetensors.index.json").read_text())
    holder = index["weight_map"]["model.norm.weight"]
    meta_list = root / "meta_list"
    meta_list.mkdir()
    (meta_list / "params.json").write_text(json.dumps(keymap.meta_params_from_args(META_ARGS)))
    sd = Transformer(META_ARGS).state_dict()
    torch.save(sd | {"norm.weight": [1.0] * META_ARGS.dim}, meta_list / "consolidated.00.pth")
    meta_text_rope = root / "meta_text_rope"
    meta_text_rope.mkdir()
    params = keymap.meta_params_from_args(META_ARGS) | {"use_scaled_rope": "false"}
    (meta_text_rope / "params.json").write_text(json.dumps(params))
    torch.save(Transformer(META_ARGS).state_dict(), meta_text_rope / "consolidated.00.pth")
    unfinished = root / "run" / "checkpoint" / "step-2"  # a training save cut short
    unfinished.mkdir(parents=True)
    (unfinished / ".metadata").write_bytes(b"")
    (unfinished / "__0_0.distcp").write_bytes(b"")
    # an HF repo whose Meta weights sit in original/: writing there would destroy them
    nested = root / "nested"
    (nested / "original").mkdir(parents=True)
    (nested / "original" / "params.json").write_text(
        json.dumps(keymap.meta_params_from_args(META_ARGS))
    )
    torch.save(Transformer(META_ARGS).state_dict(), nested / "original" / "consolidated.00.pth")

    def argv(inp: Path, *extra: str, out: Path = root / "out") -> list[str]:
        return ["--input_dir", str(inp), "--output_dir", str(out), *extra]

    return {
        "missing input": (argv(root / "nope"), "no such directory"),
        "unknown layout": (argv(root / "unknown"), "no Llama checkpoint found"),
        "told the wrong layout": (argv(hf_dir, "--source_format", "meta"), "params.json"),
        "bad config.json": (argv(bad_json), "not readable JSON"),
        "shape mismatch": (argv(wrong_shape), "config.json implies"),
        "truncated safetensors": (argv(truncated), "cannot read"),
        "missing shard": (argv(missing), "no such file"),
        "unreadable pth": (argv(meta), "not a file of tensors as torch.save writes them"),
        "flavor mismatch": (argv(hf_dir, "--flavor", "8B"), "architecture mismatch"),
        "output not empty": (argv(hf_dir, out=out_busy), "--overwrite"),
        "foreign files": (argv(hf_dir, "--overwrite", out=out_busy), "did not write"),
        "output is the input": (argv(hf_dir, "--overwrite", out=hf_dir), "overwrite the input"),
        "output inside the input": (argv(hf_dir, out=hf_dir / "dcp"), "inside the input"),
        "output is the found source": (
            argv(nested, "--source_format", "meta", "--overwrite", out=nested / "original"),
            "overwrite the input",
        ),
        "zero heads": (argv(malformed["no_heads"]), "num_attention_heads is 0"),
        "rope_scaling not a mapping": (argv(malformed["rope_string"]), "rope_scaling is 'llama3'"),
        "vocab_size null": (argv(malformed["vocab_null"]), "vocab_size is None"),
        "norm eps as text": (argv(malformed["eps_text"]), "norm_eps is '1e-5'"),
        "rope_parameters not a mapping": (
            argv(malformed["rope_list"]),
            "rope_parameters is [1, 2]; a mapping is needed",
        ),
        "odd head dimension": (argv(malformed["odd_head_dim"]), "= 1 is odd; RoPE rotates pairs"),
        "scaled RoPE as text": (argv(meta_text_rope), "use_scaled_rope is 'false'; true or false"),
        "output a new step beside saved ones": (
            argv(hf_dir, out=unfinished.parent / "step-7"),
            f"named like a step beside the saved steps of {unfinished.parent}",
        ),
        "output inside a training step": (
            argv(hf_dir, out=unfinished / "dcp"),
            f"is inside the checkpoint {unfinished}; nothing is written into a checkpoint",
        ),
        "weight_map a list": (argv(listed_map), "weight_map is not a mapping"),
        "input is a file": (
            argv(root / "a_file"),
            "--input_dir " + str(root / "a_file") + ": not a directory",
        ),
        "a tensor in two files": (
            argv(twice),
            f"model.norm.weight is in both {holder} and zz-extra.safetensors",
        ),
        "a .pth value not a tensor": (argv(meta_list), "'norm.weight' holds a list, not a tensor"),
        "output an unfinished training step": (
            argv(hf_dir, out=unfinished),
            "a training checkpoint step, which --overwrite never replaces",
        ),
    }


def _flip_a_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))


def _bad_dcp_inputs(root: Path, dcp_dir: Path, hf_dir: Path) -> dict[str, tuple[list[str], str]]:
    """Name -> (dcp_to_llama argv, words the error line must contain)."""
    import shutil

    def copy(name: str) -> Path:
        return Path(shutil.copytree(dcp_dir, root / name))

    garbage = copy("garbage")
    (garbage / ".metadata").write_bytes(b"garbage")
    incomplete = copy("incomplete")
    (incomplete / ".complete").unlink()
    no_arch = copy("no_arch")
    (no_arch / "params.json").unlink()
    no_arch_flipped = copy("no_arch_flipped")  # the architecture is asked for before a read
    (no_arch_flipped / "params.json").unlink()
    _flip_a_bit(max(no_arch_flipped.glob("*.distcp"), key=lambda p: p.stat().st_size))
    truncated = copy("truncated")
    for f in truncated.glob("*.distcp"):
        f.write_bytes(f.read_bytes()[:10])
    optim_only = root / "optim_only"
    dcp.save({"optimizer": {"x": torch.zeros(3)}}, checkpoint_id=str(optim_only), no_dist=True)
    (optim_only / ".complete").write_text('{"kind": "converted"}')
    steps = root / "checkpoint"
    for n in (10, 200, 1000):
        (steps / f"step-{n}").mkdir(parents=True)
    (root / "a_file").write_text("")
    dropped = root / "dropped"  # llama_to_dcp's default when the vocabulary changes
    convert.llama_to_dcp(hf_dir, dropped, vocab_size=512, log=lambda line: None)
    flipped = copy("flipped")  # complete, with one flipped bit in a weight
    _flip_a_bit(max(flipped.glob("*.distcp"), key=lambda p: p.stat().st_size))
    trained = root / "run" / "checkpoint" / "step-5"  # a training checkpoint, as output
    _training_checkpoint(trained, single_file=True)

    def argv(inp: Path, *extra: str, out: Path = root / "out") -> list[str]:
        return ["--input_dir", str(inp), "--output_dir", str(out), *extra]

    return {
        "missing input": (argv(root / "nope"), "no such directory"),
        "not a DCP dir": (argv(steps), f"pass one, e.g. {steps / 'step-1000'}"),
        "input is a file": (argv(root / "a_file"), "not a directory"),
        "embeddings dropped": (
            argv(dropped),
            "lacks model tensors tok_embeddings.weight, output.weight (a directory converted "
            "with the embeddings dropped",
        ),
        "unreadable metadata": (argv(garbage), "the .metadata file is unreadable"),
        "incomplete": (argv(incomplete), "incomplete (no .complete marker"),
        "unknown architecture": (argv(no_arch), "pass --flavor"),
        "unknown architecture, damaged": (argv(no_arch_flipped), "pass --flavor"),
        "--flavor against params.json": (
            argv(dcp_dir, "--flavor", "debugmodel"),
            "--flavor debugmodel disagrees with params.json",
        ),
        "truncated data": (argv(truncated), "shard __0_0.distcp is truncated"),
        "damaged, --allow_incomplete": (
            argv(flipped, "--allow_incomplete"),
            "does not match its checksum",
        ),
        "--overwrite of a training step": (
            argv(dcp_dir, "--overwrite", out=trained),
            "a full checkpoint, which --overwrite never replaces",
        ),
        "output inside the input": (argv(dcp_dir, out=dcp_dir / "export"), "inside the input"),
        "output a new step beside saved ones": (
            argv(dcp_dir, out=trained.parent / "step-99"),
            f"is named like a step beside the saved steps of {trained.parent}, where a run "
            "would move it aside or delete it",
        ),
        "output inside another step": (
            argv(dcp_dir, out=trained / "export"),
            f"is inside the checkpoint {trained}; nothing is written into a checkpoint",
        ),
        "no model tensors": (argv(optim_only), "no model tensors"),
        "push without repo": (argv(dcp_dir, "--push_to_hub"), "--hf_repo_name"),
        "private without push": (argv(dcp_dir, "--private"), "add --push_to_hub"),
        "push meta only": (
            argv(dcp_dir, "--push_to_hub", "--hf_repo_name", "a/b", "--format", "meta"),
            "--format hf",
        ),
    }


def test_every_bad_input_fails_with_one_line(hf_dir, dcp_dir, tmp_path, capsys):
    cases = [(llama_to_dcp_main, name, *case) for name, case in
             _bad_llama_inputs(tmp_path / "l", hf_dir).items()]  # fmt: skip
    (tmp_path / "d").mkdir()
    cases += [(dcp_to_llama_main, name, *case) for name, case in
              _bad_dcp_inputs(tmp_path / "d", dcp_dir, hf_dir).items()]  # fmt: skip
    capsys.readouterr()
    for main, name, argv, words in cases:
        assert main(argv) == 2, name
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: "), (name, err)
        assert words in err[0], (name, err[0])
        # our own messages say what is wrong without an exception's type name
        assert not re.search(r"(Convert|OS|Value|Type|Key)Error", err[0]), (name, err[0])


def test_a_shard_size_beyond_a_float_parses():
    from titan.convert.cli import size

    assert size("9" * 400 + "GB") == int("9" * 400) * 10**9  # float() would overflow
    assert size("1.5KB") == 1500


def test_option_mistakes_are_one_line_from_the_parser(capsys):
    """Values out of range and unknown options: one `error:` line, not argparse's usage."""
    for main, option, value, words in [
        (dcp_to_llama_main, "--max_seq_len", "-5", "argument --max_seq_len: -5 is below 1"),
        (dcp_to_llama_main, "--max_seq_len", "0", "argument --max_seq_len: 0 is below 1"),
        (dcp_to_llama_main, "--max_shard_size", "0", "'0': a size of at least one byte"),
        (dcp_to_llama_main, "--format", "gguf", "argument --format: invalid choice: 'gguf'"),
        (dcp_to_llama_main, "--fromat", "hf", "unrecognized arguments: --fromat hf"),
        (llama_to_dcp_main, "--vocab_size", "12", "argument --vocab_size: 12 is below 256"),
    ]:
        with pytest.raises(SystemExit) as exit_:
            main(["--input_dir", "in", "--output_dir", "out", option, value])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and err.startswith("error: "), (option, err)
        assert err.count("\n") == 1 and words in err, (option, err)


def test_a_full_disk_is_a_write_failure_in_one_line(hf_dir, dcp_dir, tmp_path):
    """A file-size limit makes writes fail as a full disk does (EFBIG instead of ENOSPC):
    exit 1 (not a bad input), one line naming the output folder."""
    import resource

    def run(script: str, *argv: str) -> subprocess.CompletedProcess:
        limit = (64 << 10, resource.RLIM_INFINITY)
        return subprocess.run(
            [sys.executable, str(ROOT / script), *argv],
            capture_output=True,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            timeout=120,
            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, limit),
        )

    for script, inp, extra in [
        ("llama_to_dcp.py", hf_dir, []),
        ("dcp_to_llama.py", dcp_dir, ["--format", "meta"]),
        ("dcp_to_llama.py", dcp_dir, ["--format", "hf"]),
    ]:
        out = tmp_path / f"{script}-{'-'.join(extra)}"
        result = run(script, "--input_dir", str(inp), "--output_dir", str(out), *extra)
        assert result.returncode == 1, result.stderr
        _one_line_error(result, "error: ")
        assert f"writing {out} failed" in result.stderr, result.stderr
        assert "GiB free there" in result.stderr, result.stderr


def test_free_space_is_named_only_when_the_disk_may_be_full(tmp_path):
    import errno

    denied = common.write_error(tmp_path, PermissionError(errno.EACCES, "Permission denied"))
    assert f"writing {tmp_path} failed (" in str(denied) and "Permission denied" in str(denied)
    assert "GiB free" not in str(denied)
    full = common.write_error(tmp_path, OSError(errno.ENOSPC, "No space left on device"))
    assert "GiB free there" in str(full) and full.errno == errno.ENOSPC


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a mode 0o500 folder anyway")
def test_an_unwritable_output_folder_is_a_bad_input(dcp_dir, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        for out in (locked, locked / "new"):
            argv = ["--input_dir", str(dcp_dir), "--output_dir", str(out)]
            assert dcp_to_llama_main(argv) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and f"--output_dir {out} cannot be" in err[0], err
    finally:
        locked.chmod(0o700)


def test_an_output_folder_on_a_read_only_file_system_is_refused_first(
    hf_dir, dcp_dir, tmp_path, capsys, monkeypatch
):
    """A read-only mount (faked here: the probe file's creation fails as it would there,
    even for root) is refused before the checkpoint is read and before anything is
    written, also for a folder that would be created in it."""
    import errno
    import tempfile

    from titan import files

    read_only = tmp_path / "ro"
    read_only.mkdir()
    real = tempfile.NamedTemporaryFile

    def probe(*args, dir, **kwargs):  # noqa: A002 (tempfile's name)
        if Path(dir) == read_only:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(files.tempfile, "NamedTemporaryFile", probe)
    monkeypatch.setattr(convert.from_dcp, "read_dcp_model_groups", None)  # never reached
    monkeypatch.setattr(convert.from_dcp, "integrity_problem", None)  # (reads every shard)
    monkeypatch.setattr(convert.sources.HFSource, "load", None)
    for main, inp, out, what in [
        (dcp_to_llama_main, dcp_dir, read_only, "cannot be written"),
        (llama_to_dcp_main, hf_dir, read_only / "new", f"cannot be created in {read_only}"),
    ]:
        assert main(["--input_dir", str(inp), "--output_dir", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [
            f"error: --output_dir {out} {what} (Read-only file system); choose another folder"
        ]
    assert not any(read_only.iterdir())


def test_overwrite_never_follows_a_symbolic_link(hf_dir, dcp_dir, tmp_path, capsys):
    """An `original` (or any entry) that links elsewhere is refused before anything is
    removed: the files it points to survive."""
    kept = tmp_path / "kept"
    kept.mkdir()
    for name in ("consolidated.00.pth", "params.json", "notes.txt"):
        (kept / name).write_text(name)
    stale = tmp_path / "stale_conversion"
    stale.mkdir()
    (stale / "__0_0.distcp").write_bytes(b"")
    (stale / "original").symlink_to(kept)
    export = tmp_path / "export"
    argv = ["--input_dir", str(dcp_dir), "--output_dir", str(export), "--format", "both"]
    _ok(dcp_to_llama_main(argv), capsys)
    (export / "README.md").unlink()
    (export / "README.md").symlink_to(kept / "notes.txt")
    for main, inp, out, link in [
        (llama_to_dcp_main, hf_dir, stale, "original"),
        (dcp_to_llama_main, dcp_dir, export, "README.md"),
    ]:
        argv = ["--input_dir", str(inp), "--output_dir", str(out), "--overwrite"]
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"holds symbolic links ({link})" in err[0], err
        assert "neither follows nor removes" in err[0]
        assert sorted(p.name for p in kept.iterdir()) == sorted(
            ["consolidated.00.pth", "params.json", "notes.txt"]
        )
        assert all((kept / p).read_text() == p for p in ("params.json", "notes.txt"))
    assert (export / "original" / "consolidated.00.pth").is_file()  # nothing was removed
    (export / "original").rename(tmp_path / "moved")
    (export / "original").symlink_to(kept)
    (export / "README.md").unlink()
    assert dcp_to_llama_main(["--input_dir", str(dcp_dir), "--output_dir", str(export),
                              "--overwrite"]) == 2  # fmt: skip
    assert "holds symbolic links (original)" in capsys.readouterr().err
    assert len(list(kept.iterdir())) == 3


def _interrupted(rc: int, capsys, output_dir: Path) -> None:
    assert rc == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"error: interrupted; --output_dir {output_dir} is left partial (rerun with "
        "--overwrite to replace it)"
    ]


def test_ctrl_c_is_reported_as_an_interrupt(hf_dir, dcp_dir, tmp_path, capsys, monkeypatch):
    """Exit 130 and one line, never a bad input or a failed write, however the
    KeyboardInterrupt comes out: wrapped by DCP, as the cause of another error, or
    swallowed by a library that raises its own error instead."""
    import signal

    import safetensors

    from titan.convert import sources, writers

    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        pytest.skip("SIGINT is not Python's default handler here")

    def at_call(n: int, original, fail):
        calls = [0]

        def wrapper(*args, **kwargs):
            calls[0] += 1
            if calls[0] == n:
                fail()
            return original(*args, **kwargs)

        return wrapper

    def ctrl_c() -> None:
        raise KeyboardInterrupt

    def ctrl_c_then_runtime_error() -> None:
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise RuntimeError("cannot close the file") from None

    def ctrl_c_swallowed() -> None:  # as safetensors' Rust code may do
        try:
            signal.raise_signal(signal.SIGINT)
        except KeyboardInterrupt:
            pass
        raise TypeError("could not determine the shape of object type 'UntypedStorage'")

    # llama_to_dcp: while DCP asks for a tensor (DCP wraps the interrupt), while a tensor
    # is read from a safetensors file (the interrupt lost in the library)
    argv = ["--input_dir", str(hf_dir), "--output_dir", str(tmp_path / "d")]
    with monkeypatch.context() as m:
        m.setattr(sources.HFSource, "load", at_call(3, sources.HFSource.load, ctrl_c))
        _interrupted(llama_to_dcp_main(argv), capsys, tmp_path / "d")
    with monkeypatch.context() as m:
        m.setattr(safetensors, "safe_open", at_call(5, safetensors.safe_open, ctrl_c_swallowed))
        _interrupted(llama_to_dcp_main([*argv, "--overwrite"]), capsys, tmp_path / "d")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored

    # dcp_to_llama: while DCP reads (wrapped), while the .pth is written (a RuntimeError
    # caused by the interrupt)
    argv = ["--input_dir", str(dcp_dir), "--output_dir", str(tmp_path / "x"), "--format", "both"]
    read = FileSystemReader.read_data
    with monkeypatch.context() as m:
        m.setattr(FileSystemReader, "read_data", at_call(1, read, ctrl_c))
        _interrupted(dcp_to_llama_main(argv), capsys, tmp_path / "x")
    write = writers.MetaCheckpointWriter.write
    with monkeypatch.context() as m:
        m.setattr(
            writers.MetaCheckpointWriter, "write", at_call(4, write, ctrl_c_then_runtime_error)
        )
        _interrupted(dcp_to_llama_main([*argv, "--overwrite"]), capsys, tmp_path / "x")

    # a bad input met while DCP writes keeps its own message, without a type name
    def unreadable() -> None:
        raise convert.ConvertError("cannot read model.norm.weight from a.safetensors")

    with monkeypatch.context() as m:
        m.setattr(sources.HFSource, "load", at_call(2, sources.HFSource.load, unreadable))
        argv = ["--input_dir", str(hf_dir), "--output_dir", str(tmp_path / "e")]
        assert llama_to_dcp_main(argv) == 2
    assert capsys.readouterr().err == ("error: cannot read model.norm.weight from a.safetensors\n")


def test_flavor_wins_over_an_unrelated_config_toml(tmp_path, capsys):
    """A step below a config.toml of another run: the found file is named, an explicit
    --flavor wins over it (one line says so), and the shapes are still checked."""
    step_dir = tmp_path / "dump" / "checkpoint" / "step-7"
    _training_checkpoint(step_dir, single_file=True)
    config = tmp_path / "dump" / "config.toml"
    config.write_text('[model]\nflavor = "1B"\n[training]\nseq_len = 4096\n')
    argv = ["--input_dir", str(step_dir), "--output_dir", str(tmp_path / "a")]
    assert dcp_to_llama_main(argv) == 2
    err = capsys.readouterr().err
    assert f"but {config} (flavor 1B) implies" in err, err

    out = _ok(dcp_to_llama_main([*argv, "--flavor", "debugmodel"]), capsys)
    assert f"note: --flavor debugmodel wins over {config} (flavor 1B)" in out
    assert "(from --flavor debugmodel)" in out
    card = (tmp_path / "a" / "README.md").read_text()
    assert "recipe: `unknown`" in card  # nothing of the unrelated run

    argv = ["--input_dir", str(step_dir), "--output_dir", str(tmp_path / "b"), "--flavor", "8B"]
    assert dcp_to_llama_main(argv) == 2
    assert "but --flavor 8B implies" in capsys.readouterr().err


def test_overwrite(dcp_dir, tmp_path, capsys):
    argv = ["--input_dir", str(dcp_dir), "--output_dir", str(tmp_path / "o"), "--format", "both"]
    _ok(dcp_to_llama_main(argv), capsys)
    assert dcp_to_llama_main(argv) == 2
    assert "--overwrite" in capsys.readouterr().err
    _ok(dcp_to_llama_main([*argv[:-1], "meta", "--overwrite"]), capsys)
    # The HF files and original/ of the first export are gone.
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == [
        "consolidated.00.pth",
        "params.json",
    ]


# ----------------------------------------------------------------------------- 6


def test_export_context_is_above_rope_original_context(tmp_path, capfd):
    """A run's seq_len (64 here, 256 for the debug recipe) below scaled RoPE's original
    context (8192) does not become max_position_embeddings: transformers warns on every
    load of such a config. A long-context run's seq_len stays."""
    step_dir = tmp_path / "dump" / "checkpoint" / "step-7"
    _training_checkpoint(step_dir, single_file=True)
    result = _cli("dcp_to_llama.py", "--input_dir", str(step_dir), "--output_dir",
                  str(tmp_path / "hf"))  # fmt: skip
    assert result.returncode == 0, result.stderr
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    original = config["rope_scaling"]["original_max_position_embeddings"]
    assert original == 8192 and config["max_position_embeddings"] > original
    card = (tmp_path / "hf" / "README.md").read_text()
    assert "| context (max_position_embeddings) | 65536 |" in card
    assert "- training sequence length: 64 tokens" in card
    # an explicit --max_seq_len that is raised is named
    result = _cli("dcp_to_llama.py", "--input_dir", str(step_dir), "--output_dir",
                  str(tmp_path / "hf2"), "--max_seq_len", "4096")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert (
        "note: config.json's max_position_embeddings is 65536, not --max_seq_len 4096: "
        "transformers wants it above scaled RoPE's original context (8192)" in result.stdout
    )
    capfd.readouterr()
    transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert "max_position_embeddings" not in capfd.readouterr().err

    stored = convert.read_dcp_model_metadata(step_dir)
    job = {"model": {"flavor": "debugmodel"}, "training": {"seq_len": 131072}}
    args, _ = convert.dcp_model_args(step_dir, stored, None, None, job)
    assert args.max_seq_len == 131072


# As kill -9 during a conversion: the process dies at the n-th call of a method.
_DIE_AT_CALL = """
import importlib, os, sys
module, cls, method, n, script = sys.argv[1:6]
target = getattr(importlib.import_module(module), cls)
original, calls = getattr(target, method), [0]
def dying(*args, **kwargs):
    calls[0] += 1
    if calls[0] == int(n):
        os._exit(137)
    return original(*args, **kwargs)
setattr(target, method, dying)
sys.exit(importlib.import_module(script).main(sys.argv[6:]))
"""


def _killed_at(where: str, n: int, script: str, *argv: str) -> None:
    module, cls, method = where.rsplit(".", 2)
    cmd = [sys.executable, "-c", _DIE_AT_CALL, module, cls, method, str(n), script, *argv]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert result.returncode == 137, result.stderr


def test_rerun_after_a_killed_conversion_names_the_partial_output(
    hf_dir, dcp_dir, tmp_path, capsys
):
    argv = ["--input_dir", str(hf_dir), "--output_dir", str(tmp_path / "d")]
    _killed_at("titan.convert.sources.HFSource.load", 6, "llama_to_dcp", *argv)
    assert any((tmp_path / "d").glob("*.distcp")) and not (tmp_path / "d" / ".complete").exists()
    rerun = _cli("llama_to_dcp.py", *argv)
    _one_line_error(rerun, "holds a partial conversion (no .complete marker", "--overwrite")
    _ok(llama_to_dcp_main([*argv, "--overwrite"]), capsys)
    assert (tmp_path / "d" / ".complete").is_file()

    argv = ["--input_dir", str(dcp_dir), "--output_dir", str(tmp_path / "x"), "--format", "both"]
    _killed_at("titan.convert.writers.MetaCheckpointWriter.write", 6, "dcp_to_llama", *argv)
    rerun = _cli("dcp_to_llama.py", *argv)
    _one_line_error(rerun, "holds a partial export", "interrupted", "--overwrite")
    _ok(dcp_to_llama_main([*argv, "--overwrite"]), capsys)
    files = sorted(p.name for p in (tmp_path / "x").iterdir())
    assert files == ["README.md", "config.json", "model.safetensors", "original"]  # no marker


def test_an_interrupted_output_named_like_a_training_step_is_removed_by_hand(tmp_path):
    """--overwrite never replaces a folder that looks like a training step, so the line
    after a Ctrl-C does not suggest it there."""
    from titan.convert.output import PARTIAL, left_partial

    for name, how in [("export", "rerun with --overwrite"), ("step-3", "remove it by hand")]:
        folder = tmp_path / name
        folder.mkdir()
        (folder / PARTIAL).write_text("")
        (folder / "__0_0.distcp").write_bytes(b"")
        assert f"--output_dir {folder} is left partial ({how}" in left_partial(folder)
    assert left_partial(tmp_path / "none") == ""
