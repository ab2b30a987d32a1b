"""Defaults shared by every experiment config; each config file starts from `base_config()`."""
import ml_collections


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.workdir = "runs/default"
  c.resume = True  # continue from the newest checkpoint in workdir if there is one

  # Fields of sparsejax.config.ModelConfig.
  c.model = ml_collections.ConfigDict(dict(
      vocab_size=512, d_model=256, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=64,
      ffn_hidden=768, max_seq_len=4096, rope_base=10000.0, norm_eps=1e-6, tie_embeddings=False,
      attention="dense", attention_options={}, ffn="swiglu", ffn_options={},
      dtype="bfloat16", param_dtype="float32", init_std=0.02, remat=False,
      max_segments_per_row=64))

  # Fields of sparsejax.data.DataConfig (batch_size is set from train.batch_size).
  c.data = ml_collections.ConfigDict(dict(
      source="stdlib", token_files="", token_dtype="uint16", validation_fraction=0.02,
      seq_len=256, seed=0, tokenizer="byte", bpe_vocab_size=4096))

  c.train = ml_collections.ConfigDict(dict(
      steps=1000, batch_size=16, grad_accum_steps=1, seed=0,
      lr=3e-3, schedule="wsd", warmup_steps=100, decay_fraction=0.2, min_lr_ratio=0.1,
      weight_decay=0.1, b1=0.9, b2=0.95, eps=1e-8, grad_clip=1.0, z_loss=1e-4,
      log_every=10, eval_every=200, eval_batches=8, checkpoint_every=500, keep_checkpoints=3,
      # Workdir of another run whose newest parameters start this one (when this run's
      # workdir has no checkpoint yet): fresh optimizer, step 0, this config's data.
      init_from="",
      # Parameters (the last part of their name) that init_from's checkpoint may lack because
      # this model adds them; they keep their random init. "evict_proj,evict_scale": NOSA's
      # eviction head when continuing a dense or InfLLM-V2 run.
      new_params=""))

  # Generated retrieval rows replacing a fraction of every batch's rows
  # (sparsejax.train.retrieval_mix; 0 = off). Tasks and haystacks are comma-separated. The
  # first early_batches batches use early_fraction and early_tasks ("": tasks) instead.
  c.retrieval_mix = ml_collections.ConfigDict(dict(
      fraction=0.0, tasks="passkey,multi_key,multi_value,multi_query", haystacks="noise,corpus",
      early_batches=0, early_fraction=0.0, early_tasks=""))

  # Devices are arranged (data, fsdp, tensor); data=-1 takes whatever is left.
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))

  # Sample printed at the end of pretraining.
  c.sample = ml_collections.ConfigDict(dict(
      prompt="def ", max_new_tokens=200, temperature=0.0, top_p=1.0))
  return c
