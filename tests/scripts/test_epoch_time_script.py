"""benchmarks/epoch_time.py (the GPU figures) runs end to end on tiny CPU sizes."""

from __future__ import annotations

import json

import torch


def test_epoch_time_script_on_tiny_cpu_data(tmp_path, capsys):
    from benchmarks.epoch_time import main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        argv = ["--device", "cpu", "--model", "small_cnn", "--n", "64", "--image-size", "8", "--channels", "1"]
        argv += ["--batch-size", "32", "--measure-epochs", "1", "--salun-epochs", "1", "--retrain-epochs", "4"]
        assert main([*argv, "--out", str(tmp_path / "t.json")]) == 0
    finally:
        torch.set_num_threads(threads)
    result = json.loads((tmp_path / "t.json").read_text())
    assert result["data"] == [64, 1, 8, 8] and result["retrain_extrapolated"] and result["retrain_epochs"] == 4
    assert result["epoch_seconds"] > 0 and result["salun_rte_minutes"] > 0 and result["retrain_minutes"] > 0
    assert "SalUn RTE" in capsys.readouterr().out
