"""Recipes and the command line: precedence, override syntaxes, `--help`, the resolved
plan of the cluster recipes (dry run), and one clear line for every kind of bad input."""

from __future__ import annotations

import pytest
from conftest import ROOT, run_train

from titan.config import ConfigError, load_config

GPT_NEURO_8B = """# torchtitan Config.toml
[job]
dump_folder = "./outputs/primate_8B_131k"
description = "primate-8B-131k training"
[profiling]
enable_profiling = false
save_traces_folder = "profile_trace"
profile_freq = 10
[metrics]
log_freq = 90
enable_tensorboard = false
save_tb_folder = "tb"
[model]
name = "llama3"
flavor = "8B"
norm_type = "rmsnorm"  # layernorm / np_layernorm / rmsnorm / fused_rmsnorm
[optimizer]
name = "AdamW"
lr = 3e-4
[training]
batch_size = 4
seq_len = 131072
vocab_size = 256
warmup_steps = 1000  # lr scheduler warm up
max_norm = 1.0  # grad norm clipping
steps = 50000  # number of training steps
data_parallel_replicate_degree = 2
data_parallel_shard_degree = 32
tensor_parallel_degree = 1
compile = true
dataset = "primate"
[experimental]
pipeline_parallel_degree = 1
[checkpoint]
enable_checkpoint = true
folder = "checkpoint"
interval_type = "steps"
interval = 90
model_weights_only = false
export_dtype = "bfloat16"
async_mode = "async"  # ["disabled", "async", "async_with_pinned_mem"]
[activation_checkpoint]
mode = 'full'  # ['none', 'selective', 'full']
selective_ac_option = 'op'  # 'int' = ac every positive int layer or 'op'
[float8]
enable_float8_linear = false
"""


def test_precedence_and_override_syntaxes(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text(
        "[training]\nsteps = 7\nseq_len = 64\ncompile = true\n[data]\nshuffle = true\n"
    )
    cfg = load_config(
        [
            "--job.config_file",
            str(recipe),
            "--training.seq_len=128",
            "--training.no_compile",
            "--data.no_shuffle",
            "--checkpoint.enable_checkpoint",
            "--optimizer.lr",
            "1e-3",
            "--data.source_datasets=a,b",
        ]
    )
    assert cfg.training.steps == 7  # file over default
    assert cfg.training.seq_len == 128  # command line over file
    assert cfg.training.compile is False and cfg.data.shuffle is False
    assert cfg.checkpoint.enable_checkpoint is True
    assert cfg.optimizer.lr == 1e-3 and cfg.data.source_datasets == ["a", "b"]
    assert load_config([]).training.steps == 10000  # defaults alone


def test_every_recipe_loads():
    for recipe in sorted((ROOT / "train_configs").glob("*.toml")):
        load_config(["--job.config_file", str(recipe)])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--trainig.steps=3"], "unknown config section 'trainig' (did you mean 'training'?)"),
        (
            ["--training.step=3"],
            "unknown config key 'training.step' (did you mean 'training.steps'?)",
        ),
        (["--training.lr=1"], "unknown config key 'training.lr' (did you mean 'optimizer.lr'?)"),
        (["--training.steps=three"], "training.steps = 'three': expected an integer"),
        (["--training.seq_len=0"], "training.seq_len = 0: must be a positive integer"),
        (["--training.steps=" + "9" * 30], "must be a positive integer (below 2**53)"),
        (["--job.init_timeout_s=99999999999999"], "at most 10**8"),  # (timedelta overflowed)
        (["--training.tensor_parallel_degree=2"], "training.tensor_parallel_degree = 2: only 1"),
        (["--model.flavor=9B"], "model.flavor = '9B': must be one of"),
        (["--activation_checkpoint.mode=fulll"], "(did you mean 'full'?)"),
        (["--float8.enable_float8_linear"], "float8 training is not implemented"),
        (["--job.config_file=/nonexistent.toml"], "no such file"),
        (
            [f"--job.config_file={ROOT}/train_configs/debug.toml"],
            f"no such file (beside it: {ROOT}/train_configs/debug_model.toml, ",
        ),
        (
            [f"--job.config_file={ROOT}/train_configs"],
            f"is a folder; name a TOML recipe (in it: {ROOT}/train_configs/debug_model.toml, ",
        ),
        (["train_configs/debug_model.toml"], "a recipe is passed as --job.config_file FILE"),
        (["--config", "x.toml"], "'--config'; a recipe is passed as --job.config_file FILE"),
        (["training.steps=3"], "options look like --section.key=value (see --help)"),
        (["--job.dryrun"], "unknown config key 'job.dryrun' (did you mean 'job.dry_run'?)"),
        (["--optimizer.beta1=2"], "optimizer.beta1 = 2.0: must be in [0, 1)"),
        (["--optimizer.eps=-1"], "optimizer.eps = -1.0: must be a positive finite number"),
        (["--optimizer.lr=inf"], "optimizer.lr = inf: must be a positive finite number"),
        (["--optimizer.weight_decay=-1"], "optimizer.weight_decay = -1.0: must be a finite"),
        (["--training.max_norm=nan"], "training.max_norm = nan: must be a number, not NaN"),
        (["--training.seed=-1"], "training.seed = -1: must be in 0 .. 2**63 - 1"),
        (["--checkpoint.load_step=-7"], "checkpoint.load_step = -7: must be -1 (the newest)"),
        (["--activation_checkpoint.selective_ac_option=²"], "must be 'attn', 'op' or a"),
        (["--activation_checkpoint.memory_headroom=1"], "memory_headroom = 1.0: must be in"),
        (["--activation_checkpoint.memory_limit_gib=inf"], "memory_limit_gib = inf: must be"),
        (["--eval.output=r.txt"], "eval.output = 'r.txt': must be a path ending in .json"),
        (
            ["--validation.enable", "--training.steps=100"],
            "validation.freq = 500 exceeds training.steps = 100: validation would never run",
        ),
    ],
)
def test_bad_input_is_a_config_error(argv, message):
    with pytest.raises(ConfigError, match=None) as info:
        load_config(argv)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_wrong_type_in_toml(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('[training]\nbatch_size = "four"\n')
    with pytest.raises(ConfigError, match="training.batch_size = 'four': expected an integer"):
        load_config(["--job.config_file", str(recipe)])
    recipe.write_bytes(b'[job]\ndescription = "caf\xe9"\n')  # Latin-1, not UTF-8
    with pytest.raises(ConfigError, match="r.toml: not UTF-8 text"):
        load_config(["--job.config_file", str(recipe)])
    recipe.write_text("[valdation]\n")  # an empty misspelled section is still a mistake
    with pytest.raises(ConfigError, match="unknown config section 'valdation' \\(did you mean"):
        load_config(["--job.config_file", str(recipe)])
    recipe.write_bytes(b'\xef\xbb\xbf[job]\ndescription = "bom"\n')  # a byte-order mark
    assert load_config(["--job.config_file", str(recipe)]).job.description == "bom"


BAD_RUNS = [
    # (overrides, world size, expected part of the one-line error)
    (["--training.step=3"], 1, "did you mean 'training.steps'"),
    (["--training.data_parallel_shard_degree=3"], 1, "but the world size is 1"),
    (["--training.data_parallel_replicate_degree=2"], 1, "does not divide the world size 1"),
    (["--training.global_batch_size=6", "--training.batch_size=4"], 1, "not a multiple of"),
    (["--training.seq_len=-5"], 1, "training.seq_len = -5: must be a positive integer"),
    (["--experimental.pipeline_parallel_degree=2"], 1, "only 1 is implemented"),
]


@pytest.mark.parametrize("overrides, nproc, message", BAD_RUNS)
def test_bad_recipe_exits_with_one_line(tmp_path, overrides, nproc, message):
    result = run_train(
        [
            "--job.config_file",
            "train_configs/debug_model.toml",
            f"--job.dump_folder={tmp_path}",
            *overrides,
        ],
        nproc=nproc,
        timeout=120,
    )
    assert result.returncode != 0
    err = result.stderr.strip()
    assert "Traceback" not in result.stderr + result.stdout
    assert err.count("\n") == 0 and err.startswith("error: ") and message in err, err


def test_the_launcher_checks_the_layout_of_the_ranks_it_starts(tmp_path):
    """`--standalone` (and torchrun's default) is nnodes 1:1, a fixed world size: the
    launcher checks the recipe's layout for it before any rank starts (TITAN_CHECK_ONLY:
    the check alone); an evaluation is not held to training's batch arithmetic."""
    import subprocess

    from conftest import TRAIN_ENV, assert_refused, train_command

    recipe = ["--job.config_file=train_configs/debug_model.toml", f"--job.dump_folder={tmp_path}"]

    def check(script: str, *overrides: str) -> subprocess.CompletedProcess:
        command = train_command(2, launcher="titan.launch")
        command[-1] = str(ROOT / script)
        env = {**TRAIN_ENV, "TITAN_CHECK_ONLY": "1"}
        return subprocess.run(command + recipe + list(overrides), cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=120)  # fmt: skip

    assert "--standalone" in train_command(2, launcher="titan.launch")
    assert_refused(check("train.py", "--training.data_parallel_shard_degree=3"),
                   "= 3, but the world size is 2")  # fmt: skip
    assert_refused(check("train.py", "--training.global_batch_size=6"), "use a multiple of 8")
    assert_refused(check("evaluate.py", "--training.global_batch_size=6"),
                   "no complete checkpoint in")  # its own first problem  # fmt: skip
    assert check("train.py").returncode == 0
    assert_refused(check("trian.py"), "trian.py: no such script; name the script to run")


def test_help_lists_every_key_with_its_docstring():
    result = run_train(["--help"], timeout=120)
    assert result.returncode == 0
    assert "--training.seq_len (int, default 2048)" in result.stdout
    assert "Tokens per sequence" in result.stdout
    launched = run_train(["--help"], nproc=2, launcher="titan.launch", timeout=120)
    assert launched.returncode == 0, launched.stderr  # the launcher's check lets --help through
    assert "--training.seq_len (int, default 2048)" in launched.stdout


def test_gpt_neuro_recipe_dry_run(tmp_path):
    recipe = tmp_path / "primate_8b_131k.toml"
    recipe.write_text(GPT_NEURO_8B)
    result = run_train(["--job.config_file", str(recipe), "--job.dry_run"], timeout=120)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "32 layers, dim 4096, 32 heads / 8 kv heads, FFN 14336, vocab 256" in out
    assert "131,072 tokens" in out
    assert "world 64 = 2 replicate x 32 shard (HSDP)" in out
    assert "nothing is trained" in out


def test_no_recipe_prints_the_usage_and_exits_2():
    result = run_train([], timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    usage, error = result.stderr.strip().splitlines()
    assert usage.startswith("usage: train.py --job.config_file FILE")
    assert error.startswith("error: no recipe: pass --job.config_file FILE")


def test_allowed_values_are_declared_on_the_fields():
    """Literal choices and range rules are checked wherever a value comes from."""
    with pytest.raises(ConfigError, match=r"lr_scheduler.min_lr_ratio = 1.5: must be in \[0, 1\]"):
        load_config(["--lr_scheduler.min_lr_ratio=1.5"])
    with pytest.raises(ConfigError, match="checkpoint.exclude_from_loading = 'modle': must be one"):
        load_config(["--checkpoint.exclude_from_loading=model,modle"])
    with pytest.raises(ConfigError, match="'op' or a positive integer N"):
        load_config(["--activation_checkpoint.selective_ac_option=0"])


def test_the_saved_config_reloads_as_it_was(tmp_path):
    """config.toml is TOML whatever the values: characters outside the BMP, quotes,
    infinities (json.dumps wrote surrogate escapes and Infinity, which TOML refuses)."""
    from titan.run import save_config

    cfg = load_config(
        [
            "--job.config_file=train_configs/debug_model.toml",
            f"--job.dump_folder={tmp_path}",
            '--job.description=spikes 😀 "quoted" \\ back',
            "--training.max_norm=inf",
            "--data.source_datasets=a,b",
        ]
    )
    save_config(cfg)
    again = load_config([f"--job.config_file={tmp_path / 'config.toml'}"])
    assert again.to_dict() == cfg.to_dict() | {
        "job": cfg.to_dict()["job"] | {"config_file": str(tmp_path / "config.toml")}
    }
