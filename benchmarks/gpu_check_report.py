"""The JSON-lines side of benchmarks/gpu_check.sh: one line per result, appended the moment it exists.

    python benchmarks/gpu_check_report.py emit RESULTS step=build status=ok rc=0 seconds=93
    python benchmarks/gpu_check_report.py env RESULTS dry=0 budget_s=420
    python benchmarks/gpu_check_report.py pytest RESULTS JUNIT_XML LOG [STEP]  # a test summary line (failures listed)
    python benchmarks/gpu_check_report.py table RESULTS                   # the short table printed at the end

Only the standard library at import (the env command imports torch): it must work when torch is broken.
"""

from __future__ import annotations

import json
import re
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path


def _value(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def append(results: str, record: dict) -> None:
    record = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **record}
    with open(results, "a") as f:
        f.write(json.dumps(record) + "\n")


def emit(results: str, pairs: list[str]) -> None:
    append(results, {k: _value(v) for k, v in (p.split("=", 1) for p in pairs)})


def env(results: str, pairs: list[str]) -> None:
    record: dict = {"step": "env", **{k: _value(v) for k, v in (p.split("=", 1) for p in pairs)}}
    try:
        import torch

        record.update(torch=torch.__version__, cuda=torch.version.cuda, python=sys.version.split()[0])
        record["cuda_available"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            record["gpu"] = torch.cuda.get_device_name()
            record["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    except Exception as exc:  # a broken torch is a result too
        record["torch_error"] = repr(exc)[:200]
    try:
        import diffusers

        record["diffusers"] = diffusers.__version__
    except ImportError:
        record["diffusers"] = None
    append(results, record)


def pytest_summary(results: str, junit: str, log: str, step: str = "cuda_tests_summary") -> None:
    """Counts and the failed/errored test ids: from the JUnit XML, or from the log when pytest was cut short."""
    record: dict = {"step": step}
    path = Path(junit)
    if path.exists():
        root = ET.parse(path).getroot()
        suites = [root] if root.tag == "testsuite" else list(root)
        for key in ("tests", "failures", "errors", "skipped"):
            record[key] = sum(int(s.get(key, 0)) for s in suites)
        record["passed"] = record["tests"] - record["failures"] - record["errors"] - record["skipped"]
        failed = []
        for case in root.iter("testcase"):
            if case.find("failure") is not None or case.find("error") is not None:
                failed.append(f"{case.get('classname')}::{case.get('name')}")
        record["failed_tests"] = failed
    else:
        text = Path(log).read_text(errors="replace") if Path(log).exists() else ""
        record["failed_tests"] = re.findall(r"^(?:FAILED|ERROR) (\S+)", text, flags=re.M)
        last = [line for line in text.splitlines() if re.search(r"\d+ (passed|failed|error|skipped)", line)]
        record["summary"] = last[-1].strip("= ") if last else "no summary (pytest was cut short or did not start)"
    append(results, record)


def table(results: str) -> None:
    rows = [json.loads(line) for line in Path(results).read_text().splitlines() if line.strip()]
    print("\n== steps")
    print("| step | status | rc | seconds | allotted |")
    print("|---|---|---:|---:|---:|")
    for r in rows:
        if "status" in r:
            cells = [r.get("step"), r["status"], r.get("rc", ""), r.get("seconds", ""), r.get("allotted", "")]
            print("| " + " | ".join(map(str, cells)) + " |")
    for r in rows:
        if str(r.get("step")).endswith("tests_summary"):
            counts = {k: r[k] for k in ("passed", "failures", "errors", "skipped") if k in r} or r.get("summary")
            print(f"\n== {r['step']}: {counts}")
            for name in r.get("failed_tests", [])[:40]:
                print(f"  FAILED {name}")
    print("\n== benchmarks (ratio = ms / ms of the same run's baseline; < 1 is faster)")
    print("| bench | list | dtype/density | method | ms | baseline | baseline ms | ratio |")
    print("|---|---|---|---|---:|---|---:|---:|")
    for r in rows:
        if "bench" not in r:
            continue
        what = r.get("dtype") if r["bench"] == "mask" else f"{r.get('algo')} d={r.get('density')}"
        ms = f"{r['ms']:.3f}" if "ms" in r else r.get("error", "-")
        base = f"{r['baseline_ms']:.3f}" if r.get("baseline_ms") is not None else "-"
        ratio = f"{r['ratio_to_baseline']:.2f}x" if r.get("ratio_to_baseline") is not None else "-"
        cells = [r["bench"], r.get("list"), what, r.get("method"), ms, r.get("baseline", "-"), base, ratio]
        print("| " + " | ".join(map(str, cells)) + " |")


def main(argv: list[str]) -> int:
    command, results, *rest = argv
    if command == "emit":
        emit(results, rest)
    elif command == "env":
        env(results, rest)
    elif command == "pytest":
        pytest_summary(results, *rest)
    elif command == "table":
        table(results)
    else:
        raise SystemExit(f"unknown command {command!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
