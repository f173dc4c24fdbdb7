"""Scale-out: `torchrun --nproc_per_node=N -m mezzotint generate --prompt-file ...` shares the
prompt file among the processes and writes exactly the one-process set."""
import os
import re
import subprocess
import sys

import pytest


def _generate(launcher, tiny_model, prompts, out, batch):
    cmd = [sys.executable, *launcher, "-m", "mezzotint", "generate", "--prompt-file", str(prompts),
           "--output", str(out), "--model", str(tiny_model), "--steps", "2", "--width", "32", "--height", "32",
           "--seed", "40", "--batch", str(batch), "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MEZZOTINT_NO_PROGRESS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


@pytest.mark.parametrize("batch", [1, 2])
def test_two_processes_write_the_one_process_set(tiny_model, tmp_path, batch):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\ntwo green stars\na purple ring\na yellow star\n")
    _generate([], tiny_model, prompts, tmp_path / "one", batch)
    out = _generate(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"], tiny_model, prompts,
                    tmp_path / "two", batch)
    names = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert names == [f"{i:04d}.png" for i in range(5)]
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == names
    for name in names:  # same pixels and the same metadata (prompt i, seed 40 + i): the same bytes
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    # each written once; two processes share stdout, so lines may run into each other
    assert sorted(re.findall(r"\d{4}\.png", out)) == names


def test_a_single_prompt_under_torchrun_asks_for_a_prompt_file(tiny_model, tmp_path, monkeypatch):
    from mezzotint.cli import main
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["generate", "a red circle", "--model", str(tiny_model), "--output", str(tmp_path)]) == 2
