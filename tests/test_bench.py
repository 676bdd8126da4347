"""The benchmark scripts run end to end at tiny scale on the CPU, so that a session with a GPU
never spends its device time on a broken script. Their figures mean something only on a GPU."""

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


def test_device_check_runs_the_parts_named_and_refuses_an_unknown_one(tmp_path):
    """bench/device_check.sh, the one prepared device call, at tiny scale: the part named runs with its
    own arguments and writes its figures under OUT; a misspelt part stops it before anything runs."""
    env = {**ENV, "DEVICE_CHECK_SMOKE": "1", "OUT": str(tmp_path), "PYTHON": sys.executable}
    script = str(REPO / "bench" / "device_check.sh")
    refused = subprocess.run(["bash", script, "step_l16", "step_b17"], cwd=REPO, env=env, capture_output=True, text=True)
    assert refused.returncode == 2 and "unknown part 'step_b17'" in refused.stderr
    assert not (tmp_path / "step_l16.log").exists()
    done = subprocess.run(["bash", script, "step_l16"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:]
    assert "step_l16: exit 0" in done.stdout and "vitdist:dist.strategy=ddp" in done.stdout
    results = {r["variant"]: r for r in json.loads((tmp_path / "step_l16.json").read_text())["results"]}
    assert set(results) == {REFERENCE, "timm-eager", "vitdist:dist.strategy=ddp"}
    assert all(r["img_s"] > 0 for r in results.values())
