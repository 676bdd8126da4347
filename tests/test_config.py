import os
import re
import shlex
import subprocess
import sys

import pytest
import yaml

from conftest import REPO, TINY, write_png_folder
from vitdist.config import ConfigError, Config, reference_markdown
from vitdist.config_check import batch_layout, doubts
from vitdist.config_yaml import load_config, save_config

SHARDS = "data.train_shards=/x/train-{0..3}.tar"


def test_yaml_then_overrides_typed_as_yaml():
    cfg = load_config(TINY, ["optim.lr=1e-2", "train.steps=7", "model.grad_checkpointing=true",
                             "data.crop_scale=[0.3, 1]", "data.val_shards=null", "run.dir=runs/x"])
    assert cfg.optim.lr == 0.01 and cfg.train.steps == 7 and cfg.model.grad_checkpointing is True
    assert cfg.data.crop_scale == [0.3, 1.0] and all(isinstance(v, float) for v in cfg.data.crop_scale)
    assert cfg.data.val_shards is None and cfg.run.dir == "runs/x"
    assert cfg.model.embed_dim == 128  # from the file, untouched by the overrides
    assert cfg.train.global_batch_size == 128 and cfg.dist.strategy == "ddp"  # file value; default


def test_integers_read_as_written(tmp_path):
    """Not as YAML 1.1, PyYAML's: 010 was octal 8 and 1:30 base 60, 90."""
    cfg = load_config(TINY, ["data.seed=010", "train.steps=0250", "run.dir=10:30"])
    assert (cfg.data.seed, cfg.train.steps, cfg.run.dir) == (10, 250, "10:30")
    (tmp_path / "c.yaml").write_text("data:\n  train_shards: x.tar\n  seed: 010\n")
    assert load_config(tmp_path / "c.yaml").data.seed == 10
    with pytest.raises(ConfigError, match="config key 'train.steps' must be int, got '1:30'"):
        load_config(TINY, ["train.steps=1:30"])


def test_whole_numbers_in_scientific_notation_are_integers():
    cfg = load_config(TINY, ["train.steps=1e5", "data.max_image_pixels=1.5e8", "model.patch_size=4.0"])
    assert (cfg.train.steps, cfg.data.max_image_pixels, cfg.model.patch_size) == (100_000, 150_000_000, 4)
    assert all(type(v) is int for v in (cfg.train.steps, cfg.data.max_image_pixels, cfg.model.patch_size))
    with pytest.raises(ConfigError, match="config key 'train.steps' must be int, got '1.5e0'"):
        load_config(TINY, ["train.steps=1.5e0"])


@pytest.mark.parametrize("override, value", [
    ("data.train_shards={a,b}/train-{000000..000009}.tar", "{a,b}/train-{000000..000009}.tar"),  # a YAML error
    ("data.train_shards=pipe:curl -s -H 'Authorization: Bearer t' http://x/a-{0..9}.tar",  # a mapping
     "pipe:curl -s -H 'Authorization: Bearer t' http://x/a-{0..9}.tar"),
    ("data.val_shards=2024-06-01/val.tar", "2024-06-01/val.tar"),
    ("run.dir=2024-06-01", "2024-06-01"),  # a date
    ("run.dir=0755", "0755"),  # an integer
    ("data.train_shards=out/é #1/train-{0..3}.tar", "out/é #1/train-{0..3}.tar"),  # text, then a comment
    ("data.train_shards=[a.tar, '{b,c}.tar']", ["a.tar", "{b,c}.tar"]),  # still YAML: a list, a quoted string
    ("data.val_shards=null", None),
    ("data.train_shards=pipe:curl -s 'http://h/a.tar?X-Sig=ab=='", "pipe:curl -s 'http://h/a.tar?X-Sig=ab=='"),  # = in it
    ("run.dir=/tmp/lr=1e-3", "/tmp/lr=1e-3"),
])
def test_a_key_that_takes_text_gets_it_as_written(override, value):
    key = override.split("=")[0]
    section, name = key.split(".")
    assert getattr(getattr(load_config(TINY, [override]), section), name) == value


@pytest.mark.parametrize("null", ["None", "null", "~"])
def test_pythons_none_is_yamls_null_and_null_is_a_keys_none(tmp_path, null):
    """train.resume=None (Python's spelling) was a checkpoint path named 'None': where run.dir held
    checkpoints the run resumed from them, not fresh."""
    (tmp_path / "c.yaml").write_text(f"data:\n  train_shards: x.tar\ntrain:\n  resume: {null}\n")
    assert load_config(tmp_path / "c.yaml").train.resume == "none"
    assert load_config(TINY, [f"finetune.freeze={null}"]).finetune.freeze == "none"
    if null == "~":  # an override's bare ~ for a path is the home directory (test_a_paths_leading_tilde_is_the_home_directory)
        return
    cfg = load_config(TINY, [f"train.resume={null}", f"data.val_shards={null}", f"finetune.init={null}"])
    assert (cfg.train.resume, cfg.data.val_shards, cfg.finetune.init) == ("none", None, None)
    with pytest.raises(ConfigError, match="config key 'run.dir' must be str, got None"):
        load_config(TINY, [f"run.dir={null}"])


def test_text_that_reads_as_null_round_trips_quoted(tmp_path):
    (tmp_path / "c.yaml").write_text("data:\n  train_shards: x.tar\nrun:\n  dir: 'None'\n")
    cfg = load_config(tmp_path / "c.yaml")
    save_config(cfg, tmp_path / "saved.yaml")
    assert cfg.run.dir == "None" and load_config(tmp_path / "saved.yaml") == cfg


def test_a_paths_leading_tilde_is_the_home_directory(monkeypatch, tmp_path):
    """As a shell would expand it, which it does not after `run.dir=`: the run wrote into a
    directory named `~` under the working directory. In the YAML file too."""
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "c.yaml").write_text("data:\n  val_shards: ~/val.tar\nrun:\n  dir: ~/runs/b16\n")
    cfg = load_config(tmp_path / "c.yaml", ["data.train_shards=['~/a-{0..3}.tar', 'pipe:cat ~/b.tar']",
                                            "finetune.init=~/w.pth", "train.resume=~/runs/old/checkpoints"])
    assert cfg.data.train_shards == [f"{tmp_path}/a-{{0..3}}.tar", "pipe:cat ~/b.tar"]
    assert cfg.data.val_shards == f"{tmp_path}/val.tar" and cfg.run.dir == f"{tmp_path}/runs/b16"
    assert (cfg.finetune.init, cfg.train.resume) == (f"{tmp_path}/w.pth", f"{tmp_path}/runs/old/checkpoints")
    assert load_config(TINY, ["run.dir=~"]).run.dir == str(tmp_path)  # YAML's null, refused as no text, was meant


@pytest.mark.parametrize("override", ["data.rand_augment=", "data.val_shards= ", "train.resume="])
def test_an_override_with_no_value_is_refused_not_read_as_null(override):
    """`data.val_shards=$VAL` with VAL not set: YAML reads nothing as null, which turned validation
    (or RandAugment, or a resume) off without a word."""
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=re.escape(f"override '{override}' gives {key} no value (a shell variable "
                                                    "that is not set?): give one, or null for none")):
        load_config(TINY, [override])


def test_the_slurm_scripts_fill_run_dir_with_the_job_name_as_given():
    """slurm/common.sh's run.dir patterns: a job named r&d ran in runs/r%xd-7."""
    out = subprocess.run(["bash", "-c", 'source slurm/common.sh; vitdist_job_patterns "runs/%x-%j" 7 "r&d (é)"'],
                         cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out == "runs/r&d (é)-7\n"
    # A leading ~user as the ranks read it (os.path.expanduser): the scripts looked for FATAL and
    # FINISHED in a folder named ~root.
    out = subprocess.run(["bash", "-c", 'source slurm/common.sh; vitdist_job_patterns "$1" 7 x', "-", "~root/r-%j"],
                         cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out == os.path.expanduser("~root/r-7") + "\n" and not out.startswith("~")
    # An unknown user's stays as it is, as Python leaves it, also under submit_pipeline.sh's set -e.
    out = subprocess.run(["bash", "-c", 'set -euo pipefail; source slurm/common.sh; vitdist_job_patterns "$1" 7 x', "-",
                          "~nosuchuser/r-%j"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out == "~nosuchuser/r-7\n" == os.path.expanduser("~nosuchuser/r-7") + "\n"


@pytest.mark.parametrize("text", ["runs/pre-7/tb", "runs/my run/tb", "it's", "", "a\\b $HOME `x` \"y\""])
def test_the_slurm_scripts_quote_a_printed_command_where_python_would(text):
    """slurm/submit_pipeline.sh's tensorboard command: a run dir with a space pastes as printed."""
    out = subprocess.run(["bash", "-c", 'source slurm/common.sh; vitdist_quoted "$1"', "-", text],
                         cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert (out == f"{text}\n") == (shlex.quote(text) == text)  # quoted where Python would quote it
    assert subprocess.run(["bash", "-c", f"printf %s {out}"], capture_output=True, text=True).stdout == text


def test_a_brace_pattern_the_shell_expanded_is_refused_not_cut_to_its_last_shard():
    expanded = [f"data.train_shards=/d/train-{i}.tar" for i in range(4)]  # bash's words for an unquoted {0..3}
    with pytest.raises(ConfigError, match=r"'data.train_shards' is given twice in a row .* Quote it"):
        load_config(TINY, ["run.dir=r", *expanded])
    # In a list too, whose shard the last override left alone: 1 of 4, and --check passed.
    with pytest.raises(ConfigError, match=r"'data.train_shards' is given twice in a row .* Quote it"):
        load_config(TINY, ["run.dir=r", *(f"data.train_shards=[/d/train-{i}.tar]" for i in range(4))])
    later = load_config(TINY, ["data.train_shards=/d/a.tar", "run.dir=r", "data.train_shards=/d/b.tar"])
    assert later.data.train_shards == "/d/b.tar"  # a later override of an earlier one still wins
    unset = load_config(TINY, ["data.val_shards=/d/val-{0..3}.tar", "data.val_shards=null"])
    assert unset.data.val_shards is None  # a pattern, then its removal: nothing the shell expanded


def test_every_shipped_config_loads():
    paths = sorted((REPO / "configs").rglob("*.yaml"))
    # Those README.md names, at least: a loop over no file (a move, a .yml) would check nothing.
    assert {f"{p.parent.name}/{p.stem}" for p in paths} >= {
        "pretrain/tiny", "pretrain/vit_s16", "pretrain/vit_b16", "pretrain/vit_l16", "pretrain/vit_h14",
        "pretrain/vit_g14", "finetune/tiny_digits", "finetune/vit_b16"}
    for path in paths:
        load_config(path)


def test_vit_b16_is_the_paper_size():
    cfg = load_config(REPO / "configs/pretrain/vit_b16.yaml")
    from vitdist.model import build_model
    import torch
    with torch.device("meta"):
        model = build_model(cfg.model)
    assert len(model.blocks) == 12 and model.embed_dim == 768 and model.blocks[0].attn.num_heads == 12
    assert model.blocks[0].mlp.fc1.out_features == 3072 and cfg.model.img_size == 224


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=1", "unknown config key 'optim.lrr'; valid keys in 'optim': lr, min_lr"),
    ("optimizer.lr=1", "unknown config key 'optimizer.lr'; keys are <section>.<name> with sections: model, data"),
    ("lr=1", "unknown config key 'lr'"),
    ("optim.lr=fast", "config key 'optim.lr' must be float, got 'fast'"),
    ("train.steps=1.5", "config key 'train.steps' must be int, got 1.5"),
    ("train.steps=true", "config key 'train.steps' must be int, got True"),
    ("model.grad_checkpointing=1", "config key 'model.grad_checkpointing' must be bool, got 1"),
    ("train.precision=fp16", "config key 'train.precision' must be 'bf16' | 'fp32', got 'fp16'"),
    ("dist.strategy=zero", "config key 'dist.strategy' must be 'ddp'"),
    ("data.crop_scale=[0.1, x]", "config key 'data.crop_scale[1]' must be float, got 'x'"),
    ("data.crop_scale=0.5", "config key 'data.crop_scale' must be list[float], got 0.5"),
    ("model.num_classes=null", "config key 'model.num_classes' must be int, got None"),
    ("model.patch_size=true", "config key 'model.patch_size' must be int | null, got True"),
    ("model.patch_size=8.5", "config key 'model.patch_size' must be int | null, got 8.5"),
    ("data.val_shards=[1, 2]", "config key 'data.val_shards' must be str | list[str] | null, got [1, 2]"),
    ("train.steps", "override 'train.steps' is not of the form key.sub=value"),
    ("data.train_shards=[/d/a-{0..3}.tar, /d/b-{0..3}.tar]", "override 'data.train_shards=[/d/a-{0..3}.tar, "
     "/d/b-{0..3}.tar]': a list whose items hold braces needs each item quoted"),
    ("optim.betas=[0.9, 0.99, 0.5]", "config key 'optim.betas' must have 2 numbers"),
    ("train.steps=0", "config key 'train.steps' must be > 0, got 0"),
    ("data.crop_scale=[1.0, 0.5]", "config key 'data.crop_scale' is a range, low to high: got [1.0, 0.5]"),
    ("optim.clip_grad_norm=-1", "config key 'optim.clip_grad_norm' must be >= 0, got -1.0"),
    ("optim.betas=[0.9, 1.0]", "config key 'optim.betas' must be >= 0 and < 1, got [0.9, 1.0]"),
    ("optim.lr=.nan", "config key 'optim.lr' must be float, got nan"),
    ("optim.lr=inf", "config key 'optim.lr' must be float, got 'inf'"),
    ("train.label_smoothing=1.5", "config key 'train.label_smoothing' must be >= 0 and <= 1, got 1.5"),
    ("data.val_crop_frac=0", "config key 'data.val_crop_frac' must be > 0 and <= 1, got 0.0"),
    ("model.drop_path_rate=1", "config key 'model.drop_path_rate' must be >= 0 and < 1, got 1.0"),
    ("data.std=[0.2, 0, 0.2]", "config key 'data.std' must be > 0 and <= 1, got [0.2, 0.0, 0.2]"),
    # 0-255 values, as mmcv's configs give them: the run trained on inputs near -2 everywhere, learning nothing
    ("data.mean=[123.675, 116.28, 103.53]", "config key 'data.mean' must be >= 0 and <= 1, got [123.675, 116.28, 103.53]"),
    ("data.std=[58.395, 57.12, 57.375]", "config key 'data.std' must be > 0 and <= 1, got [58.395, 57.12, 57.375]"),
    ("optim.warmup_steps=-1", "config key 'optim.warmup_steps' must be >= 0"),
    ("train.seed=18446744073709551616", "config key 'train.seed' must be >= 0 and < 4294967296, got 1844"),
    ("data.streams=3", "train.global_batch_size=128 is not divisible by data.streams=3"),
    ("data.train_shards=''", "config key 'data.train_shards' is empty"),
    ("data.train_shards=[]", "config key 'data.train_shards' is empty"),
    # '' is the working directory: the run validated on it as an ImageFolder, after warning that val_shards was null
    ("data.val_shards=''", "config key 'data.val_shards' is empty: give shards, or null for no validation"),
    # as null, without a word; a validation asked for warned of val_shards=null
    ("data.val_shards=[]", "config key 'data.val_shards' is empty: give shards, or null for no validation"),
    # passed, then failed in a log line's ETA (float()) or at the process group's start (timedelta, torch's store)
    ("train.steps=1e400", "config key 'train.steps' is a number of 1329 bits, more than a 64-bit integer holds"),
    ("train.steps=1e5000", "config key 'train.steps' is a number of 16610 bits, more than a 64-bit integer holds"),
    ("dist.timeout_s=1e10", "config key 'dist.timeout_s' must be > 0 and <= 31536000, got 10000000000"),
])
def test_refusals_name_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(TINY, [override])
    assert message in str(e.value)


@pytest.mark.parametrize("overrides, message", [
    (["train.compile=true", "train.activation_memory_budget=1.5"],
     "config key 'train.activation_memory_budget' must be >= 0 and <= 1, got 1.5"),
    (["train.activation_memory_budget=0.5"], "train.activation_memory_budget < 1 needs train.compile=true"),
    (["train.compile=true", "train.activation_memory_budget=0.5", "model.grad_checkpointing=true"],
     "two ways to recompute activations"),
    (["train.compile=true", "train.activation_memory_budget=0.5", "model.drop_path_rate=0.1"],
     "train.activation_memory_budget=0.5 with model.drop_path_rate=0.1: compile's partitioner would draw drop path's "
     "masks again in backward"),
])
def test_an_activation_memory_budget_needs_compile_no_full_checkpointing_and_no_drop_path(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(TINY, overrides)
    assert message in str(e.value)
    assert load_config(TINY, ["train.compile=true", "train.activation_memory_budget=0"]).train.activation_memory_budget == 0


def test_mixup_needs_an_even_micro_batch():
    with pytest.raises(ConfigError, match="need an even data.micro_batch_size .*, got 33"):
        load_config(TINY, ["train.cutmix_alpha=1.0", "data.micro_batch_size=33"])
    assert load_config(TINY, ["train.cutmix_alpha=1.0", "data.micro_batch_size=32"]).train.cutmix_alpha == 1.0


def test_bad_files_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="config file '.*nope.yaml' does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml' is not valid YAML"):
        load_config(bad)
    bad.write_text("model: 3\n")
    with pytest.raises(ConfigError, match="section 'model' must be a mapping"):
        load_config(bad)
    bad.write_text("data:\n  train_shards: x.tar\nmodel:\n  depth: 3\nfinetune:\n  # init: x\n")  # keys all commented out
    assert load_config(bad).model.depth == 3
    for document in ("[]", "false", "0"):  # read as no keys at all, where 42 or a list were refused
        bad.write_text(f"{document}\n")
        with pytest.raises(ConfigError, match="bad.yaml: expected a mapping of sections"):
            load_config(bad)
    bad.write_bytes("model:\n  depth: 3 # d\xe9faut\n".encode("latin-1"))  # an editor's Latin-1: a traceback, exit 1
    with pytest.raises(ConfigError, match="bad.yaml' is not UTF-8 text: 'utf-8' codec can't decode byte 0xe9"):
        load_config(bad)
    bad.write_text("model:\n  depht: 3\n")
    with pytest.raises(ConfigError, match="unknown config key 'model.depht'; valid keys in 'model': arch, img_size"):
        load_config(bad)


@pytest.mark.parametrize("text, message", [
    # PyYAML keeps the last of two keys: the second section would drop steps and global_batch_size
    ("train:\n  steps: 5\n  global_batch_size: 64\ndata:\n  train_shards: x.tar\ntrain:\n  seed: 3\n",
     "key 'train' is given twice"),
    ("data:\n  train_shards: x.tar\n  seed: 1\n  seed: 2\n", "key 'seed' is given twice"),
    ("data:\n  train_shards: x.tar\ntrian:\n  # steps: 5\n", "unknown section 'trian'; sections are: model, data"),
])
def test_a_file_that_would_lose_or_ignore_keys_is_refused(tmp_path, text, message):
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(tmp_path / "c.yaml")


@pytest.mark.parametrize("world, micro, workers, message", [
    # Before the batch: no global batch divides on 3 ranks while 16 streams do not (a resume keeps them).
    (3, 64, 1, "data.streams=16 cannot be dealt out to 3 ranks, each owning whole streams: run on a number of ranks "
               "that divides it (1, 2, 4, 8, 16), or, for a new run, give data.streams a multiple of 3"),
    (2, 48, 1, "not divisible by world size 2 x data.micro_batch_size=48 (global = world x micro x accumulation "
               "steps): each rank takes 64 samples a step: give data.micro_batch_size=32, the largest below 48 that "
               "divides it"),
    (4, 64, 1, "each rank takes 32 samples a step: give data.micro_batch_size=32, the largest below 64 that divides it"),
    (4, 32, 3, "data.streams=16 is not a multiple of ranks x workers = 4 x 3 = 12; each loader worker must own "
               "whole streams: give data.num_workers a divisor of 4, the streams per rank"),
])
def test_batch_layout_refusals(world, micro, workers, message):
    cfg = load_config(TINY, [f"data.micro_batch_size={micro}", f"data.num_workers={workers}"])
    with pytest.raises(ConfigError, match=re.escape(message)):
        batch_layout(cfg, world)


def test_batch_layout_accumulation():
    cfg = load_config(TINY, ["data.micro_batch_size=16"])
    assert batch_layout(cfg, 1) == 8 and batch_layout(cfg, 2) == 4 and batch_layout(cfg, 8) == 1


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(TINY, ["optim.lr=0.5"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["optim"]["lr"] == 0.5


def test_readme_reference_is_current():
    readme = (REPO / "README.md").read_text()
    assert reference_markdown() in readme, "regenerate with: vitdist config-reference"
    assert set(Config.__dataclass_fields__) == {"model", "data", "optim", "train", "dist", "ckpt", "log", "finetune", "run"}


def test_entry_point_refuses_before_any_process_group(tmp_path):
    """A bad key exits with code 2 and the key's name, before torch.distributed is touched."""
    run = subprocess.run([sys.executable, "launch/pretrain.py", "--config", str(TINY), "optim.lrr=1",
                          f"run.dir={tmp_path}"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert "config error: unknown config key 'optim.lrr'" in run.stderr
    assert not (tmp_path / "config.yaml").exists()


def test_torchrun_reports_each_ranks_own_exit_code_when_one_ends_later(tmp_path):
    """torchrun sends SIGTERM to the ranks left once one has exited; one that came while Python shut
    down (rank 0's, slowed here by an object whose deletion waits) killed it: `exitcode: -15`, where
    it had exited with 2 (or a preemption's 75) as the others."""
    (tmp_path / "sitecustomize.py").write_text(
        "import builtins, os, time\n"
        "class Slow:\n    def __del__(self):\n        time.sleep(3)\n"
        "if os.environ.get('RANK') == '0':\n    builtins.slow_to_go = Slow()\n")
    from conftest import ENV, pretrain_command

    run = subprocess.run(pretrain_command(2, ["optim.lrr=1", f"run.dir={tmp_path / 'run'}"]), cwd=REPO, text=True,
                         capture_output=True, timeout=120, env={**ENV, "PYTHONPATH": os.pathsep.join([str(tmp_path), ENV["PYTHONPATH"]])})
    assert run.returncode == 1 and run.stderr.count("config error: unknown config key 'optim.lrr'") == 2, run.stderr
    assert run.stderr.count("exitcode  : 2") == 2 and "exitcode  : -15" not in run.stderr, run.stderr


def test_messages_are_written_a_whole_line_at_a_time(monkeypatch, tmp_path):
    """Every rank writes its refusal to the same pipe (torchrun's output, a SLURM log). print's two
    writes, the text then the newline, each reach the pipe under PYTHONUNBUFFERED=1 (set in many
    containers), so two ranks' lines were met run together: '... lower data.streamsconfig error: ...'.
    One write of a whole line is not cut by another process's."""
    from vitdist import entry

    writes = []

    class Recorder:
        def write(self, text):
            writes.append(text)
            return len(text)

        def flush(self):
            pass

    for key in ("WORLD_SIZE", "RANK", "TORCHELASTIC_USE_AGENT_STORE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(sys, "stderr", Recorder())
    write_png_folder(tmp_path / "images", per_class=6)
    warned = ["train.steps=10", "optim.warmup_steps=20", "data.val_shards=null", f"data.train_shards={tmp_path / 'images'}"]
    for overrides, code in ((["optim.lrr=1"], 2), ([*warned, "--check"], 0)):
        monkeypatch.setattr(sys, "argv", ["pretrain.py", "--config", str(TINY), f"run.dir={tmp_path}", *overrides])
        assert entry.main("", finetune=False) == code
    assert any(w.startswith("config error: unknown config key 'optim.lrr'") for w in writes), writes
    assert any(w.startswith("config warning: optim.warmup_steps=20 > train.steps=10") for w in writes), writes
    assert writes and all(w.endswith("\n") and w.count("\n") == 1 for w in writes), writes


def test_overrides_on_both_sides_of_the_options(tmp_path):
    run = subprocess.run([sys.executable, "launch/pretrain.py", "train.steps=5", "--config", str(TINY), "--check",
                          f"run.dir={tmp_path}", "optim.lrr=1"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert "config error: unknown config key 'optim.lrr'" in run.stderr, run.stderr


def test_a_second_config_file_or_a_run_dir_that_cannot_be_made_is_refused_also_under_check(tmp_path):
    """argparse read the last --config alone. A run.dir under a file passed --check by hand (which
    takes no lock, whose opening finds it), to fail at the run's first write; and so in a SLURM job."""
    (tmp_path / "file").write_text("")
    for options, message in (
            (["--config", str(TINY), "--config", str(TINY)], f"error: --config is given 2 times ({TINY}, {TINY}): give "
                                                             "one file"),
            (["--config", str(TINY), f"run.dir={tmp_path / 'file' / 'run'}"],
             f"config error: run.dir '{tmp_path / 'file' / 'run'}' cannot be made: '{tmp_path / 'file'}' is not a directory (a file")):
        for check in (["--check"], []):
            run = subprocess.run([sys.executable, "launch/pretrain.py", *options, *check], cwd=REPO, capture_output=True,
                                 text=True, timeout=120, env={**os.environ, "VITDIST_SLURM_JOB": "1"})
            assert run.returncode == 2 and message in run.stderr, run.stderr


def test_check_only_validates_for_the_world_size_given(demo_shards, tmp_path):
    """`--check` (run first by the SLURM jobs): 0 for a config that fits WORLD_SIZE, 2 for one that
    does not; nothing is written either way."""
    from conftest import ENV, shard_overrides

    command = [sys.executable, "launch/pretrain.py", "--config", str(TINY), "--check", *shard_overrides(demo_shards),
               f"run.dir={tmp_path / 'run'}"]
    ok = subprocess.run(command, cwd=REPO, env={**ENV, "WORLD_SIZE": "2"}, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    refused = subprocess.run(command, cwd=REPO, env={**ENV, "WORLD_SIZE": "3"}, capture_output=True, text=True,
                             timeout=120)
    assert refused.returncode == 2 and "config error:" in refused.stderr
    missing = subprocess.run([*command, f"train.resume={tmp_path / 'gone'}"], cwd=REPO, env={**ENV, "WORLD_SIZE": "2"},
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2, missing.stderr
    assert f"config error: train.resume='{tmp_path / 'gone'}' is not a complete checkpoint directory (it does not exist)" in missing.stderr
    assert not (tmp_path / "run").exists()


def test_a_warmup_longer_than_the_run_is_warned_of_with_the_share_of_the_peak_reached():
    """The last step's rate is train.steps / optim.warmup_steps of optim.lr: "rises to 0.05 of
    optim.lr=0.001", as README shows, not the rate itself (5e-05 "of optim.lr" read as a share)."""
    cfg = load_config(TINY, ["optim.warmup_steps=1000", "train.steps=50", "optim.lr=0.001"])
    assert doubts(cfg)[0] == ("optim.warmup_steps=1000 > train.steps=50: the learning rate rises to 0.05 of "
                              "optim.lr=0.001 and never decays")
    from vitdist.schedule import lr_at
    last = lr_at(49, lr=0.001, min_lr=cfg.optim.min_lr, warmup_steps=1000, total_steps=50)
    assert last == pytest.approx(0.05 * 0.001)


def test_likely_mistakes_are_warned_of_once_and_still_run(demo_shards, tmp_path):
    """A long run's config with a short run's overrides: allowed, but said, by rank 0 alone, also
    under `--check` (what SLURM jobs run first). A directory given as the config is named as one."""
    from conftest import ENV, shard_overrides

    usual = [sys.executable, "launch/pretrain.py", "--config", str(TINY), "--check", *shard_overrides(demo_shards),
             f"run.dir={tmp_path / 'run'}"]
    command = [*usual, "train.steps=10", "optim.warmup_steps=20", "optim.min_lr=0.01", "data.val_shards=null",
               "finetune.freeze=backbone", "model.drop_path_rate=0.1"]
    run = subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    warned = [line for line in run.stderr.splitlines() if line.startswith("config warning: ")]
    assert warned == ["config warning: optim.warmup_steps=20 > train.steps=10: the learning rate rises to 0.5 of "
                      "optim.lr=0.002 and never decays",
                      "config warning: optim.min_lr=0.01 > optim.lr=0.002: the learning rate rises after the warmup",
                      "config warning: finetune.freeze=backbone with model.drop_path_rate=0.1: the frozen blocks are "
                      "still dropped at random in training, so the head learns from noisier features than it is "
                      "evaluated on (a linear probe usually has 0)",
                      "config warning: finetune.freeze=backbone without finetune.init: the head is trained on a backbone "
                      "of random weights, frozen",
                      "config warning: train.eval_every_steps=100, but data.val_shards is null: nothing is validated"]
    other_rank = subprocess.run(command, cwd=REPO, env={**ENV, "RANK": "1"}, capture_output=True, text=True, timeout=120)
    assert other_rank.returncode == 0 and "config warning" not in other_rank.stderr
    plain = subprocess.run(usual, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)
    assert plain.returncode == 0 and "config warning" not in plain.stderr, plain.stderr
    folder = subprocess.run([*command[:3], str(tmp_path), "--check"], cwd=REPO, env=ENV, capture_output=True, text=True,
                            timeout=120)
    assert folder.returncode == 2 and f"config file '{tmp_path}' is not a file" in folder.stderr
