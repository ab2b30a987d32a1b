"""Sharded equals unsharded: one train step on a (2 data x 2 fsdp x 2 tensor) mesh of 8 virtual
CPU devices gives the loss and parameters of the same step on one device."""
import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent("""
    import sys
    import jax
    import numpy as np
    sys.path.insert(0, {root!r})
    from tests.test_train import micro_config
    from sparsejax.train.trainer import Trainer

    assert jax.device_count() == 8, jax.devices()
    results = {{}}
    for name, mesh, devices in [("single", dict(data=1, fsdp=1, tensor=1), jax.devices()[:1]),
                                ("sharded", dict(data=2, fsdp=2, tensor=2), None)]:
      c = micro_config({workdir!r} + "/" + name, steps=2, checkpoint_every=0, batch_size=8,
                       warmup_steps=0)  # a nonzero first learning rate
      c.model.update(num_heads=4, num_kv_heads=2, d_model=64, ffn_hidden=128)
      c.mesh.update(mesh)
      t = Trainer(c, progress=False, devices=devices)
      if name == "sharded":
        specs = {{str(x.sharding.spec) for x in jax.tree.leaves(t.params)}}
        assert any("tensor" in s for s in specs) and any("fsdp" in s for s in specs), specs
      before = jax.tree.map(np.asarray, t.params)
      summary = t.train(steps=1)
      moved = max(jax.tree.leaves(jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))),
                                               before, jax.tree.map(np.asarray, t.params))))
      assert moved > 1e-4, moved  # the step really updated the parameters
      results[name] = (summary["history"][0]["loss"], jax.tree.map(np.asarray, t.params))
    (loss_a, pa), (loss_b, pb) = results["single"], results["sharded"]
    print("losses", loss_a, loss_b)
    assert abs(loss_a - loss_b) < 1e-5 * abs(loss_a), (loss_a, loss_b)
    diffs = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), pa, pb))
    print("max param diff", max(diffs))
    assert max(diffs) < 1e-5, max(diffs)

    # cuDNN attention needs q, k, v sharded alike: rows over (data, fsdp), heads over tensor
    # where the KV heads divide (here 2 of them over 2 shards; 1 of them stays replicated).
    from jax.sharding import PartitionSpec as P
    from sparsejax.ops.attention import _shard_alike
    for kv_heads, heads_axis in [(2, "tensor"), (1, None)]:
      q, k = np.zeros((8, 16, 4, 8), np.float32), np.zeros((8, 16, kv_heads, 8), np.float32)
      with jax.set_mesh(t.mesh):
        placed = jax.jit(_shard_alike)(q, k, k)
      want = jax.sharding.NamedSharding(t.mesh, P(("data", "fsdp"), None, heads_axis, None))
      assert all(x.sharding.is_equivalent_to(want, 4) for x in placed), [x.sharding for x in placed]
    print("OK")
""")


def test_sharded_train_step_equals_single_device(tmp_path):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  script = SCRIPT.format(root=ROOT, workdir=str(tmp_path))
  proc = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
