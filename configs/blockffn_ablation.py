"""The BlockFFN ablation (arXiv 2507.08771, its 0.1B comparison) at a few H100-minutes a method.

  python -m experiments.blockffn_ablation                       # all six methods, one table
  python -m experiments.pretrain --config=configs/blockffn_ablation.py:remoe
  python -m experiments.pretrain --config=configs/blockffn_ablation.py:blockffn,tiny   # CPU

The argument is a method, optionally followed by ",tiny" (a model for tests) or ",cpu" (the
ablation at a size two CPU cores train in about half an hour for all six methods):
  dense           SwiGLU FFN (the paper's dense baseline)
  relu_dense      non-gated ReLU FFN (not in the paper's table; the Sparsing-Law dense variant)
  topk_moe        softmax router, top-k of E experts, Switch balance loss
  remoe           ReLU router, L1 penalty with ReMoE's adaptive coefficient
  blockffn        ReLU + RMSNorm router, activation-locality and chunk-sparsification losses
  blockffn_no_al  blockffn without L_al;  blockffn_no_cs  without L_cs

Model, the same for every method: byte-level vocabulary (259), d_model 384, 8 layers, 6 query
heads and 2 KV heads of 64, sequences of 512 tokens, 32 rows per step (16,384 tokens), 1,000
steps (16.4M tokens, ~12.9M parameters: about 1.3 tokens per parameter, far below the paper's
0.1B models trained on billions of tokens, so compare orderings and ratios, not values).
GPU time (H100, 2026-12-06): this model is launch-bound. Six runs side by side at 64 rows a step
made ~164k tokens/s together (300 steps each in ~6 minutes), so the 64-row version needed ~17
GPU-minutes in all, more than a session's device time; at 32 rows three methods side by side
take ~5 minutes: experiments/gpu_blockffn.sh runs three per call.

Matching (as the paper's 0.1B setup, scaled down): every expert kind has E = 48 experts of width
w = 32 (d/12, so E*w = 4d as in the paper's 48 x 64 at d = 768) and a [d, E] router: 1,198,080
FFN parameters per layer. The dense SwiGLU gets ffn_hidden = E(2w+1)/3 = 1040, the same
1,198,080, so total parameters are equal. Active parameters: TopK MoE uses k = 10 of 48 (the
paper's "10in48" baseline), ReMoE's target sparsity is 1 - 10/48 = 79.2% (the same expected
active count); BlockFFN's sparsity is not set by a knob (the paper reports 80.5% TLS at 0.1B,
close to the baselines' 79.2%), and dense activates everything.

Schedules are scaled to the short run: lambda_cs holds 200 steps (paper 1000) and compares
windows of 50 steps (paper 100); ReMoE's L1 coefficient starts at 1e-5 (ReMoE: 1e-8 with a x1.2
rule; at x1.05 per step a 1e-8 start would spend a third of this run below any effect).
"""
from configs.base import base_config

METHODS = ("dense", "relu_dense", "topk_moe", "remoe", "blockffn", "blockffn_no_al",
           "blockffn_no_cs")
# The six of the paper's table, in its order.
ABLATION = ("dense", "topk_moe", "remoe", "blockffn", "blockffn_no_al", "blockffn_no_cs")


def matched_dense_hidden(num_experts: int, expert_width: int) -> int:
  """The SwiGLU width with the expert FFN's parameters: 3*d*f = d*E*(2w + 1)."""
  units = num_experts * (2 * expert_width + 1)
  if units % 3:
    raise ValueError(f"num_experts={num_experts}, expert_width={expert_width}: E(2w+1)={units} "
                     "is not a multiple of 3, so no SwiGLU width matches it exactly")
  return units // 3


# Sizes: experts (E of width w; top_k active for TopK, ReMoE's target 1 - top_k / E), the
# lambda_cs schedule (hold, window), the model, the row length and the training run.
SIZES = {
    # A model for tests.
    "tiny": dict(experts=6, width=8, top_k=1, hold=2, window=1, seq_len=64,
                 model=dict(d_model=32, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16,
                            dtype="float32"),
                 train=dict(steps=3, batch_size=4, warmup_steps=1, log_every=1,
                            eval_batches=1)),
    # The same comparison at a size two CPU cores train in a few minutes per method: E*w = 4d
    # (32 experts of 16), 7 of 32 active for TopK (ReMoE's target 78%), schedules scaled down.
    "cpu": dict(experts=32, width=16, top_k=7, hold=120, window=30, seq_len=256,
                model=dict(d_model=128, num_layers=3, num_heads=2, num_kv_heads=1, head_dim=64,
                           dtype="float32"),
                train=dict(steps=600, batch_size=16, warmup_steps=60, log_every=25,
                           eval_batches=4)),
    # The ablation (module docstring).
    "gpu": dict(experts=48, width=32, top_k=10, hold=200, window=50, seq_len=512,
                model=dict(d_model=384, num_layers=8, num_heads=6, num_kv_heads=2, head_dim=64,
                           dtype="bfloat16"),
                train=dict(steps=1000, batch_size=32, warmup_steps=100, log_every=50,
                           eval_batches=8)),
}


def get_config(arg: str = "blockffn"):
  parts = [p.strip() for p in (arg or "blockffn").split(",")]
  method, extra = parts[0], parts[1:]
  if method not in METHODS:
    raise ValueError(f"configs/blockffn_ablation.py: method must be one of {METHODS}, "
                     f"got {method!r}")
  if extra not in ([], ["tiny"], ["cpu"]):
    raise ValueError(f"configs/blockffn_ablation.py: after the method only ',tiny' or ',cpu' "
                     f"may follow, got {arg!r}")
  size = extra[0] if extra else "gpu"
  tiny = size == "tiny"
  z = SIZES[size]

  c = base_config()
  c.workdir = f"runs/blockffn_ablation/{method}"
  experts, width, top_k, hold, window = (z[k] for k in ("experts", "width", "top_k", "hold",
                                                           "window"))
  c.model.update(vocab_size=259, max_seq_len=z["seq_len"], **z["model"])
  c.data.seq_len = z["seq_len"]
  c.train.update(lr=3e-3, decay_fraction=0.2, eval_every=0, checkpoint_every=z["train"]["steps"],
                 **z["train"])
  c.sample.max_new_tokens = 0
  experts_opts = dict(num_experts=experts, expert_width=width)
  c.model.ffn_hidden = matched_dense_hidden(experts, width)
  if method == "dense":
    c.model.update(ffn="swiglu", ffn_options={})
  elif method == "relu_dense":
    # Two matrices instead of three: E*w + E/2 units keep the parameter count.
    c.model.update(ffn="relu_ffn", ffn_options={},
                   ffn_hidden=experts * width + experts // 2)
  elif method == "topk_moe":
    c.model.update(ffn="topk_moe", ffn_options=dict(experts_opts, top_k=top_k,
                                                    renormalize=True, balance_weight=1e-2))
  elif method == "remoe":
    c.model.update(ffn="remoe", ffn_options=dict(
        experts_opts, target_sparsity=1 - top_k / experts, l1_weight=1e-5, l1_multiplier=1.05))
  else:
    c.model.update(ffn="blockffn", ffn_options=dict(
        experts_opts, use_al=method != "blockffn_no_al", use_cs=method != "blockffn_no_cs",
        al_weight=2e-3, alpha=100.0, cs_weight=5e-2, chunk_len=64 if not tiny else 8,
        cs_schedule="adaptive", cs_hold=hold, cs_window=window))
  return c
