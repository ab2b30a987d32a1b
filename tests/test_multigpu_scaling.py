"""experiments/multigpu_scaling on 4 virtual CPU devices with a micro model: every mesh's losses
match the single-device run's, the checkpoint written on the fsdp mesh restores on one device
bit for bit, and a mesh whose run fails is reported without stopping the others."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from experiments.multigpu_scaling import mesh_shapes, timed_throughput

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent("""
    import sys
    import jax
    sys.path.insert(0, {root!r})
    from tests.test_train import micro_config
    import experiments.multigpu_scaling as scaling

    # A mesh whose run raises before it starts: reported, and the other meshes still run.
    scaling.MESHES["broken"] = lambda n: (n, 1, 1)
    train_run = scaling.train_run

    def failing_train_run(config, name, *args):
      if name == "broken":
        raise ValueError("injected failure")
      return train_run(config, name, *args)

    scaling.train_run = failing_train_run
    assert jax.device_count() == 4, jax.devices()
    config = micro_config({workdir!r}, batch_size=4)  # f32; each run gets <workdir>/<mesh>
    result = scaling.run_scaling(config, ["data", "fsdp", "fsdp_tensor", "broken"], loss_steps=3,
                                 timed_steps=2, workdir={workdir!r}, cpu_restore=True)
    scaling.write_outputs(result, {out!r})
""")


def test_meshes_match_single_device_and_checkpoint_restores(tmp_path):
  # Unoptimised XLA:CPU code compiles in about half the time; the step's arithmetic is the same.
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4 "
             "--xla_backend_optimization_level=0")
  out = str(tmp_path / "scaling")
  script = SCRIPT.format(root=ROOT, workdir=str(tmp_path / "runs"), out=out)
  proc = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  with open(out + ".json") as f:
    result = json.load(f)
  assert result["n_devices"] == 4 and len(result["single"]["losses"]) == 3
  rows = {row["mesh"]: row for row in result["rows"]}
  assert {name: row["shape"] for name, row in rows.items()} == {
      "data": [4, 1, 1], "fsdp": [1, 4, 1], "fsdp_tensor": [1, 2, 2], "broken": [4, 1, 1]}
  assert rows.pop("broken")["error"] == "ValueError: injected failure"
  assert result["failures"] == ["broken: ValueError: injected failure"]
  for row in rows.values():
    assert len(row["losses"]) == 3
    assert row["max_abs_loss_diff"] < 1e-4, row  # f32: only the summation order differs
    assert row["losses_match"] and row["tokens_per_s"] > 0 and row["scaling_efficiency"] > 0
  ckpt = result["checkpoint"]
  assert ckpt["written_on"].startswith("data 1 x fsdp 4 x tensor 1") and ckpt["step"] == 5
  for label in ("1gpu", "cpu"):
    assert ckpt[f"restored_on_{label}_equal"], ckpt
    assert ckpt[f"restored_on_{label}"]["row_loss_abs_diff"] < 1e-4, ckpt
  markdown = open(out + ".md").read()
  assert "| fsdp_tensor | 1 x 2 x 2 |" in markdown and "max |loss - single loss|" in markdown
  assert "| broken | 4 x 1 x 1 | **failed**: ValueError: injected failure |" in markdown


@pytest.mark.parametrize("names, n, message", [
    (["data", "pipeline"], 2, r"unknown \['pipeline'\]"),
    (["fsdp_tensor"], 3, "fsdp_tensor is data x fsdp x tensor = 1 x 1 x 2"),
    (["data"], 3, r"does not divide config.train.batch_size=16"),
])
def test_meshes_that_do_not_fit(names, n, message):
  with pytest.raises(ValueError, match=message):
    mesh_shapes(names, n, batch_size=16)


def test_one_device_has_no_meshes():
  assert mesh_shapes(["data", "fsdp", "fsdp_tensor"], 1, batch_size=16) == {}


def test_timed_throughput_leaves_out_the_first_window():
  tokens = 100  # per step
  history = [{"step": 60, "tokens_per_s": 10 * tokens / 5.0},  # steps 51-60: the warm-up
             {"step": 75, "tokens_per_s": 15 * tokens / 1.5},  # 61-75 in 1.5 s
             {"step": 80, "tokens_per_s": 5 * tokens / 0.5}]   # 76-80 in 0.5 s
  assert timed_throughput(history, 50, tokens) == pytest.approx(20 * tokens / 2.0)
