"""The benchmark scripts run end to end at tiny scale on the CPU, so that a session with a GPU
never spends its device time on a broken script. Their figures mean something only on a GPU."""

import importlib.util
import json
import subprocess
import sys

import pytest

from conftest import ENV, REPO, TINY

pytestmark = pytest.mark.slow

REFERENCE = "vitdist:train.compile=false;dist.strategy=ddp"


def run_bench(script: str, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, str(REPO / "bench" / script), *args], cwd=REPO, env=ENV,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_train_step_bench_times_each_variant_and_checks_its_numerics(tmp_path):
    fsdp, broken = "vitdist:train.compile=false;dist.strategy=fsdp", "timm-eager:inductor.no_such_option=1"
    out = tmp_path / "step.json"
    run_bench("train_step.py", "--config", str(TINY), "--batch", "8", "--classes", "8", "--warmup", "1",
              "--steps", "1", "--repeats", "2", "--check-steps", "4", "--lr", "1e-2", "--variants", f"timm-eager,{fsdp},{broken}",
              "--out", str(out))
    results = {r["variant"]: r for r in json.loads(out.read_text())["results"]}
    assert list(results) == [REFERENCE, "timm-eager", fsdp, broken]  # the numerics reference comes first
    assert "no_such_option" in results[broken]["error"]  # one bad variant does not cost the others
    for name in (REFERENCE, "timm-eager", fsdp):
        assert results[name]["img_s"] > 0 and results[name]["saved_mib_per_img"] > 0, name
    # Same initial weights and batches: FSDP's bf16 parameters give the autocast reference's losses,
    # which move (at lr 1e-2 the 4 fixed batches are learnt) so that a wrong start would show.
    reference = results[REFERENCE]["losses"]
    assert len(reference) == 4 and reference[-1] < reference[0] - 0.2
    assert results[fsdp]["losses"] == pytest.approx(reference, rel=2e-2)
    assert results[fsdp]["loss_rel_diff"] < 2e-2 and results[fsdp]["x_timm"] is None  # no compiled timm row


def test_train_step_bench_keeps_the_finished_variants_figures_when_stopped(tmp_path):
    """bench/device_check.sh stops a part at its time limit: the figures of the variants it finished
    must be in its JSON, whole, not lost with the table it never printed."""
    out = tmp_path / "step.json"
    bench = subprocess.Popen([sys.executable, str(REPO / "bench" / "train_step.py"), "--config", str(TINY), "--batch", "8",
                              "--classes", "8", "--warmup", "1", "--steps", "1", "--repeats", "1", "--check-steps", "2",
                              "--variants", "vitdist:dist.strategy=ddp", "--out", str(out)],
                             cwd=REPO, env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        first = next(line for line in bench.stdout if line.startswith('{"variant"'))
        assert bench.poll() is None  # still compiling the second variant
    finally:
        bench.kill()
        bench.wait()
    results = json.loads(out.read_text())["results"]
    assert results[0] == json.loads(first) and results[0]["variant"] == REFERENCE and results[0]["img_s"] > 0


def test_each_row_is_compared_with_timms_step_compiled_alike():
    """x timm: each row against the `timm` row compiled with the same inductor/dynamo settings."""
    spec = importlib.util.spec_from_file_location("train_step", REPO / "bench" / "train_step.py")
    train_step = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_step)
    rates = {"timm": 100, "vitdist:dist.strategy=ddp": 110, "timm:inductor.a=1;dynamo.b=2": 120,
             "vitdist:dynamo.b=2;dist.strategy=ddp;inductor.a=1": 150, "timm-eager:inductor.a=1;dynamo.b=2": 90,
             "vitdist:dist.strategy=ddp;inductor.a=2": 130}
    rows = [{"variant": name, "img_s": rate, "flops_per_img": 1e9, "losses": None} for name, rate in rates.items()]
    train_step.compare(rows, 1e12)
    assert [r["x_timm"] for r in rows] == pytest.approx([1.0, 1.1, 1.0, 1.25, 0.75, None])
    assert rows[0]["mfu"] == pytest.approx(0.1)


def test_data_pipeline_bench_measures_both_decodes_alone_and_in_training(tmp_path):
    out = tmp_path / "data.json"
    run_bench("data_pipeline.py", "--quick", "--cache", str(tmp_path / "shards"), "--out", str(out))
    results = json.loads(out.read_text())
    assert results["shards"]["samples"] == 128
    assert {(r["decode"], r["workers"]) for r in results["loader"]} == {("cpu", 0), ("cpu", 2), ("gpu", 0), ("gpu", 2)}
    assert all(r["samples_per_sec"] > 0 for r in results["loader"])
    assert set(results["device_work"]) == {"decode_and_resize", "resize_batched", "resize_one_by_one"}
    assert [r["decode"] for r in results["training"]] == ["cpu", "gpu"]
    for run in results["training"]:
        assert run["images_per_sec"]["mean"] > 0 and 0 <= run["data_wait_frac"]["mean"] <= 1


def test_jpeg_reduce_bench_times_both_ways_on_the_same_crops(tmp_path):
    """At 224 px, a 500x375 photo's crops are hardly ever 448 px a side (reduced), a 1024x768 one's
    mostly are, and come within a few levels of the full decode's."""
    out = tmp_path / "reduce.json"
    run_bench("jpeg_reduce.py", "--sizes", "500x375,1024x768", "--crops", "20", "--out", str(out))
    small, large = json.loads(out.read_text())["rows"]
    assert small["reduced_share"] < 0.2 and large["reduced_share"] >= 0.5
    assert all(r["full_per_s"] > 0 and r["reduced_per_s"] > 0 for r in (small, large))
    assert 0 < large["mean_abs_diff"] < 10


def test_data_pipeline_bench_writes_its_shards_once(tmp_path):
    """The shards are cached in --cache: a run with the same spec reads them instead of writing them
    again (12,000 JPEGs are 20-30 s of a device call); another spec writes them anew."""
    spec = importlib.util.spec_from_file_location("data_pipeline", REPO / "bench" / "data_pipeline.py")
    data_pipeline = importlib.util.module_from_spec(spec)
    sys.modules["data_pipeline"] = data_pipeline  # the writing processes find write_shard by its module's name
    try:
        spec.loader.exec_module(data_pipeline)

        def files():
            return {p.name: p.stat().st_ino for p in tmp_path.glob("*.tar")}

        first = data_pipeline.ensure_shards(tmp_path, 4, 2)
        written = files()
        assert data_pipeline.ensure_shards(tmp_path, 4, 2) == first
        assert files() == written  # the same files, not new ones renamed into place
        data_pipeline.ensure_shards(tmp_path, 6, 2)
        assert set(files()) == set(written) | {"bench-000002.tar"} and files().items().isdisjoint(written.items())
    finally:
        del sys.modules["data_pipeline"]


def test_data_pipeline_bench_keeps_its_figures_when_a_training_run_fails(tmp_path):
    """A training run that fails costs its own row only: the figures measured before it are kept,
    the next run still runs, each error is recorded, and the script exits non-zero."""
    out = tmp_path / "data.json"
    failed = subprocess.run([sys.executable, str(REPO / "bench" / "data_pipeline.py"), "--cache", str(tmp_path / "shards"),
                             "--out", str(out), "--samples", "32", "--per-shard", "8", "--workers", "0", "--batch", "8",
                             "--loader-batches", "1", "--config", str(TINY), "--train-workers", "0", "--micro-batch", "5"],
                            cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert failed.returncode != 0 and "2 training run(s) failed" in failed.stderr, failed.stderr[-3000:]
    results = json.loads(out.read_text())
    assert len(results["loader"]) == 2 and all(r["samples_per_sec"] > 0 for r in results["loader"])
    assert [r["decode"] for r in results["training"]] == ["cpu", "gpu"]
    assert all("data.micro_batch_size=5" in r["error"] for r in results["training"])


def test_device_check_runs_the_parts_named_and_refuses_an_unknown_one(tmp_path):
    """bench/device_check.sh, the one prepared device call, at tiny scale: the part named runs with its
    own arguments and writes its figures under OUT; a misspelt part stops it before anything runs."""
    env = {**ENV, "DEVICE_CHECK_SMOKE": "1", "OUT": str(tmp_path), "PYTHON": sys.executable}
    script = str(REPO / "bench" / "device_check.sh")
    refused = subprocess.run(["bash", script, "step_l16", "step_b17"], cwd=REPO, env=env, capture_output=True, text=True)
    assert refused.returncode == 2 and "unknown part 'step_b17'" in refused.stderr
    assert not (tmp_path / "device_check.log").exists()
    done = subprocess.run(["bash", script, "step_l16"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:]
    assert "step_l16: exit 0" in done.stdout and "vitdist:dist.strategy=ddp" in done.stdout
    table = done.stdout.split("== step_l16\n")[1]  # under its part's name, from the line naming the peak
    assert " bf16 matmul peak " in table.splitlines()[0] and "vitdist:dist.strategy=ddp" in table
    # The device tool brings back 8 files at most: one log for all parts, and each part's figures.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["device_check.log", "step_l16.json"]
    assert "===== step_l16: " in (tmp_path / "device_check.log").read_text()
    results = {r["variant"]: r for r in json.loads((tmp_path / "step_l16.json").read_text())["results"]}
    assert set(results) == {REFERENCE, "timm", "vitdist:dist.strategy=ddp"}  # timm compiled, as on the GPU
    assert all(r["img_s"] > 0 and r["x_timm"] > 0 for r in results.values())
