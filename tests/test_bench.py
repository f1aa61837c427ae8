"""The extraction benchmark command prints the figures the closing notes quote."""

from __future__ import annotations

import json

from PIL import Image

from core import cli


def test_bench_extract_json(tmp_path, capsys):
    from skimage import data

    folder = tmp_path / "photos"
    folder.mkdir()
    for i, name in enumerate(["astronaut", "coffee", "chelsea", "rocket"] * 2):
        Image.fromarray(getattr(data, name)()).convert("RGB").rotate(i).save(folder / f"{name}{i}.jpg")
    assert cli.main(["bench", "extract", "--images", str(folder), "--upscale", "600", "--repeats", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    for key in ("device", "backbone", "batch_size", "n_images", "forward_img_s", "pipeline_img_s",
                "naive_img_s", "cache_hit_s"):
        assert key in result
    assert result["n_images"] == 8 and result["computed_on_second_run"] == 0
    assert min(result["forward_img_s"], result["pipeline_img_s"], result["naive_img_s"]) > 0
    assert result["omp_wait_policy"] == "PASSIVE"


def test_bench_extract_runs_on_fresh_caches_and_under_load(tmp_path, capsys):
    from skimage import data

    folder = tmp_path / "photos"
    folder.mkdir()
    for i, name in enumerate(["astronaut", "coffee", "chelsea"]):
        Image.fromarray(getattr(data, name)()).convert("RGB").save(folder / f"{name}{i}.jpg")
    args = ["bench", "extract", "--images", str(folder), "--repeats", "1", "--runs", "2", "--busy"]
    assert cli.main([*args, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert len(result["runs"]) == 2 and len(result["pipeline_vs_forward_each_run"]) == 2
    for run in result["runs"]:
        assert run["batch_size"] in (1, 2, 4, 8, 16, 32, 64) and run["pipeline_img_s"] > 0 and run["failed"] == 0
    assert result["idle_img_s"] > 0 and result["busy_one_core_img_s"] > 0 and result["busy_vs_idle"] > 0


def test_bench_refuses_a_missing_folder(tmp_path, capsys):
    assert cli.main(["bench", "extract", "--images", str(tmp_path / "nope")]) == 2
    assert "not a folder" in capsys.readouterr().err
