"""Named random streams (one epoch_generator for every domain) and the one JSON writer."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from salun_ext.utils import STREAMS, UsageError, derive_seed, epoch_generator, stream_seed, write_json


def test_stream_numbers_are_frozen():
    # the published tables (docs/results/) were produced with these numbers; renaming is fine, renumbering is not
    frozen = {"retain": 1, "rl.forget": 11, "rl.retain": 12, "rl.mixed": 13, "rl.labels": 14, "ga.forget": 21}
    frozen |= {"ga.retain": 22, "be.forget": 31, "iu": 41, "scrub.forget": 51, "scrub.retain": 52, "ssd": 61}
    frozen |= {"init": 0xC0FFEE}
    assert {k: STREAMS[k] for k in frozen} == frozen
    assert len(set(STREAMS.values())) == len(STREAMS), "two streams share a number: their draws would coincide"


def test_epoch_generator_is_the_seed_sequence_of_seed_stream_epoch():
    # the definition, written out with NumPy's SeedSequence (independent of derive_seed's code)
    def mix(*parts):
        a, b = np.random.SeedSequence(list(parts)).generate_state(2, dtype=np.uint32)
        return (int(a) << 31) ^ int(b)

    want = torch.Generator().manual_seed(mix(mix(7, 12), 3)).initial_seed()
    assert epoch_generator(7, 3, "rl.retain").initial_seed() == want
    assert stream_seed(7, "rl.retain") == mix(7, 12) == derive_seed(7, 12)
    draws = {s: torch.rand(4, generator=epoch_generator(7, 3, s)) for s in ("retain", "diffusion", "lm")}
    assert not torch.equal(draws["retain"], draws["diffusion"]) and not torch.equal(draws["diffusion"], draws["lm"])
    assert torch.equal(torch.rand(4, generator=epoch_generator(7, 3, "lm")), draws["lm"])  # replayable
    with pytest.raises(UsageError, match=r"stream: expected one of .*got 'retian'"):
        epoch_generator(7, 3, "retian")


def test_write_json_is_atomic_and_strict(tmp_path):
    path = tmp_path / "sub" / "out.json"
    write_json({"a": float("nan"), "b": (1.0, float("inf")), "t": torch.tensor(2.5), 3: "x"}, path)
    assert json.loads(path.read_text()) == {"a": None, "b": [1.0, None], "t": 2.5, "3": "x"}
    assert "NaN" not in path.read_text() and list(path.parent.iterdir()) == [path]  # no temporary file left

    class Unserialisable:
        def __str__(self):
            return "as text"

    write_json({"x": Unserialisable()}, path)
    assert json.loads(path.read_text()) == {"x": "as text"}


def test_the_next_run_removes_the_temporary_files_a_killed_write_left(tmp_path):
    import subprocess
    import sys

    from salun_ext.utils import OutputFolder

    folder = tmp_path / "run"
    # a process killed in the middle of atomic_save (os._exit: no finally runs, as with SIGKILL)
    code = (
        "import os, sys, torch\nfrom salun_ext.utils.files import atomic_save\n"
        "def dying(obj, target):\n    torch.save(obj, target)\n    os._exit(9)\n"
        "atomic_save({'w': torch.ones(3)}, sys.argv[1], saver=dying)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(folder / "ckpt" / "last.pt")], check=False)
    assert proc.returncode == 9
    orphans = list(folder.glob("**/.*.tmp"))
    assert len(orphans) == 1 and orphans[0].parent.name == "ckpt", orphans
    (folder / ".notes.tmp").write_text("a user's file")  # not atomic_save's naming: kept
    (folder / "keep.tmp").write_text("kept")
    (folder / "other").mkdir()  # a folder of the user's, not the run's checkpoints: not touched
    (folder / "other" / ".x.abcd1234.tmp").write_text("someone else's")

    with OutputFolder(folder) as out:
        assert out.orphans_removed == orphans
    assert not orphans[0].exists() and not (folder / "ckpt" / "last.pt").exists()
    assert (folder / ".notes.tmp").read_text() == "a user's file" and (folder / "keep.tmp").exists()
    assert (folder / "other" / ".x.abcd1234.tmp").exists()
