"""benchmarks/gpu_check.sh in its rehearsal mode (GPU_CHECK_DRY=1): the plumbing of the one-call GPU check."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_dry_run_appends_one_json_line_per_result(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, GPU_CHECK_DRY="1", OUT=str(out), PY=sys.executable, OMP_NUM_THREADS="1")
    done = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    lines = (out / "results.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]  # every line is one JSON object
    steps = {r["step"]: r for r in rows if "step" in r}
    assert steps["env"]["dry"] == 1 and steps["env"]["budget_s"] == 420
    assert steps["build"]["status"] == "skipped" and steps["diffusion"]["status"] == "skipped"
    for name in ("kernels_status", "mask_860m", "optim"):
        assert steps[name]["status"] == "ok", steps[name]
        assert 0 < steps[name]["allotted"] <= 420
    summary = steps["cuda_tests_summary"]
    assert summary["failures"] == 0 and summary["errors"] == 0 and summary["skipped"] > 0
    assert steps["done"]["seconds"] >= 0
    masks = [r for r in rows if r.get("bench") == "mask"]
    assert {r["method"] for r in masks} == {"salun_ext", "cat_topk"}
    ours = next(r for r in masks if r["method"] == "salun_ext")
    assert ours["baseline"] == "cat_topk" and ours["ratio_to_baseline"] > 0 and ours["selected"] == ours["k"]
    optim = [r for r in rows if r.get("bench") == "optim"]
    assert {(r["algo"], r["method"]) for r in optim} >= {("sgd", "salun_ext"), ("adamw", "torch_fused+mask")}
    assert all(r["baseline"] == "torch_fused+mask" and r["baseline_ms"] > 0 for r in optim)
    # the rows come before the step line that produced them: written as measured, not at the end
    assert lines.index(json.dumps(steps["optim"])) > max(i for i, r in enumerate(rows) if r.get("bench") == "optim")
    assert "| optim | unet686x16 |" in done.stdout and (out / "summary.md").exists()
    llm = [r for r in rows if r.get("bench") == "llm_scale"]  # the 7B step's script, on a tiny Llama
    assert steps["llm_scale"]["status"] == "ok" and llm[0]["case"] == "mask"
    assert llm[0]["selected"] == int(llm[0]["numel"] * 0.1)  # exactly k = floor(N * density)
    by_method = {r["method"]: r for r in llm[1:]}
    assert set(by_method) == {"torch_fused", "compact", "dense"}
    # at density 0.1 the compact moments are a tenth of the dense ones (the same bytes for fused AdamW's)
    assert by_method["compact"]["state_bytes"] * 5 < by_method["dense"]["state_bytes"]
    assert by_method["dense"]["state_bytes"] == by_method["torch_fused"]["state_bytes"]
    assert all(r["ratio_to_baseline"] > 0 for r in llm[1:] if r["method"] != "torch_fused")
