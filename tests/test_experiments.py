"""The absl binaries, end to end, as a user runs them (tiny sizes)."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args):
  proc = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True,
                        timeout=600, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
  return proc.stdout


def test_pretrain_then_generate(tmp_path):
  workdir = str(tmp_path / "run")
  out = run("experiments.pretrain", "--config=configs/tiny.py", f"--config.workdir={workdir}",
            "--config.train.steps=12", "--config.train.warmup_steps=2",
            "--config.train.eval_every=12", "--config.train.eval_batches=1",
            "--config.train.checkpoint_every=6", "--config.sample.max_new_tokens=8",
            "--config.model.num_layers=1", "--config.data.seq_len=32")
  assert "initial eval: loss" in out and "final eval: loss" in out and "sample:" in out
  assert os.path.exists(os.path.join(workdir, "summary.json"))
  out = run("experiments.generate", f"--workdir={workdir}", "--prompt=def ", "--prompt=x = ",
            "--max_new_tokens=8")
  assert "checkpoint step 12" in out and out.count("-" * 60) == 2


def test_tile_unions_smoke():
  """experiments/tile_unions.py at 2560 tokens: a tile's union is at least as large as its
  tokens' own selections, for the kernel's consecutive tiles and the regrouped ones."""
  import json
  out = run("experiments.tile_unions", "--seq_len=2560")
  result = json.loads(out.strip().splitlines()[-1])
  one = result["one_token"]["mean"]
  assert 0 < one <= 64
  assert result["consecutive"]["mean"] >= one and result["regrouped"]["mean"] >= one
