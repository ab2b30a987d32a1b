"""The notebooks run top to bottom on the CPU and print what their computations produce."""
import os
import re

import nbformat
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_notebook(name: str) -> str:
  """Executes notebooks/<name> with the checkout on PYTHONPATH; returns its code cells' text
  outputs (stdout and stderr streams), joined."""
  nb = nbformat.read(os.path.join(ROOT, "notebooks", name), as_version=4)
  env_path = os.environ.get("PYTHONPATH", "")
  os.environ["PYTHONPATH"] = ROOT + (os.pathsep + env_path if env_path else "")
  try:
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": ROOT}}).execute()
  finally:
    os.environ["PYTHONPATH"] = env_path
  return "".join(o.get("text", "") for cell in nb.cells if cell.cell_type == "code"
                 for o in cell.get("outputs", []))


def printed(pattern: str, text: str) -> list[str]:
  """The groups of the first line matching `pattern`; fails naming the pattern when none does."""
  match = re.search(pattern, text)
  assert match, f"no output line matches {pattern!r}:\n{text}"
  return list(match.groups())


def test_quickstart_notebook_runs():
  outputs = run_notebook("quickstart.ipynb")
  assert "validation bits/byte before:" in outputs and "restored step 150" in outputs


def test_sparse_methods_notebook_runs():
  outputs = run_notebook("sparse_methods.ipynb")
  number = r"([-+0-9.e]+)"
  # 1. InfLLM-V2 ops: selection covering every block is dense attention; the Pallas kernel
  # (interpret mode) matches the jnp reference; the top-k selection really drops keys.
  (every,) = printed(r"\(every block\) vs dense: max \|diff\| = " + number, outputs)
  (topk,) = printed(r"topk=8 vs dense: +max \|diff\| = " + number, outputs)
  out_diff, lse_diff = printed(r"interpret\) vs jnp reference: max \|out diff\| = " + number
                               + r", max \|lse diff\| = " + number, outputs)
  (fraction,) = printed(r"attended fraction of the causal \(query, key\) pairs: ([0-9.]+)%", outputs)
  assert float(every) < 1e-5 and float(topk) > 1e-2
  assert float(out_diff) < 1e-4 and float(lse_diff) < 1e-4
  assert 0 < float(fraction) < 100
  # 2. dense -> infllmv2: same parameters, identical below dense_len, different above it.
  dense_params, sparse_params = printed(r"parameters: dense ([0-9,]+), infllmv2 ([0-9,]+)", outputs)
  assert dense_params == sparse_params
  (short_diff,) = printed(r"100 tokens \(dense path\): max \|logit diff\| = " + number, outputs)
  (long_diff,) = printed(r"384 tokens \(sparse path\): max \|logit diff\| = " + number, outputs)
  assert float(short_diff) == 0 and float(long_diff) > 0
  # NOSA: its eviction head's two parameters per layer; locality measured for both rules.
  (extra,) = printed(r"parameters: nosa [0-9,]+ \(\+([0-9]+)\)", outputs)
  assert int(extra) == 2 * (2 * 16 * 2 + 2)   # 2 layers x (W_delta [2, 16, 2] + A [2])
  for name in ("infllmv2", "nosa"):
    (hit,) = printed(name + r": adjacent steps share layer 0 ([0-9.]+)%", outputs)
    assert 0 < float(hit) <= 100
  # 3. eviction: every scorer kept exactly the budget; keeping everything equals `generate`.
  for scorer in ("streaming", "h2o", "snapkv", "locret"):
    printed(scorer + r" +entries kept per \(layer, KV head\) \[\[32, 32\], \[32, 32\]\]", outputs)
  assert "compression=1 equals full-cache generate: True" in outputs
  # 4. BlockFFN: sparsity metrics in range; the union kernel (interpret) matches the dense mix.
  (tls,) = printed(r"token-level sparsity \(TLS\): ([0-9.]+)%", outputs)
  (cls8,) = printed(r"chunk-level sparsity CLS8: ([0-9.]+)%", outputs)
  assert 0 < float(tls) < 100 and 0 <= float(cls8) <= float(tls)
  (union,) = printed(r"union kernel \(2 layers\) vs dense mix: max \|logit diff\| = " + number,
                     outputs)
  assert float(union) < 1e-4
