"""benchmarks/diffusion_gpu.py runs end to end (tiny UNet on the CPU), so the lead's GPU run does not fail late."""

from __future__ import annotations

import json

from benchmarks.diffusion_gpu import main


def test_gpu_benchmark_script_smoke(tmp_path):
    out = tmp_path / "gpu.json"
    result = main(["--tiny", "--device", "cpu", "--reps", "1", "--batch", "2", "--amp", "none", "--json", str(out)])
    saved = json.loads(out.read_text())
    assert saved["unet"] == "tiny" and set(saved["steps"]) == {"unmasked", "masked", "torch_fused"}
    assert 0.99 < result["mask"]["bits_per_param"] < 1.1  # the mask is 1 bit per parameter (+ segment padding)
    assert all(row["step_ms_median"] > 0 for row in result["steps"].values())
