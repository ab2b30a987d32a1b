"""The KV-eviction flags shared by experiments.eval_longctx and experiments.eviction_sweep.

Importing this module defines the flags; `policy(...)` builds the `EvictionConfig` from them and
`load_heads(model)` the retaining heads for the locret scorer.
"""
from absl import flags

from sparsejax.inference.eviction import (DECODE_MODES, POOLINGS, POSITION_MODES,
                                          EvictionConfig)

CHUNK_SIZE = flags.DEFINE_integer("eviction_chunk_size", 1024,
                                  "Prefill chunk: the cache evicts after every chunk, so it "
                                  "never holds more than budget + chunk entries per KV head.")
STABILIZERS = flags.DEFINE_integer("eviction_stabilizers", None,
                                   "The most recent entries always kept (Locret's n_s).")
SINKS = flags.DEFINE_integer("eviction_sinks", 4, "The first tokens always kept (attention "
                             "sinks, StreamingLLM: 4).")
POSITION_MODE = flags.DEFINE_enum("eviction_position_mode", "original", list(POSITION_MODES),
                                  "RoPE positions of the kept entries: their original ones, "
                                  "or re-assigned contiguously (the Locret code).")
LOCAL_LEN = flags.DEFINE_integer("eviction_local_len", 0,
                                 "The last prompt tokens prefilled without eviction (Locret's "
                                 "n_loc = 100).")
DECODE_MODE = flags.DEFINE_enum("eviction_decode_mode", "grow", list(DECODE_MODES),
                                "Decoding appends to the cache ('grow') or evicts back to the "
                                "budget after every token ('evict').")
SNAPKV_WINDOW = flags.DEFINE_integer("snapkv_window", 32, "SnapKV's observation window.")
SNAPKV_KERNEL = flags.DEFINE_integer("snapkv_kernel", 7, "SnapKV's pooling kernel (odd).")
SNAPKV_POOLING = flags.DEFINE_enum("snapkv_pooling", "max", list(POOLINGS), "SnapKV's pooling.")
EVICTION_SEED = flags.DEFINE_integer("eviction_seed", 0, "Seed of the random scorer.")
RETAINING_HEADS = flags.DEFINE_string("retaining_heads", None,
                                      "Directory of trained retaining heads (save_retaining_heads)"
                                      " for the locret scorer.")
INIT_RETAINING_HEADS = flags.DEFINE_bool("init_retaining_heads", False,
                                         "Smoke tests only: run locret with freshly initialised "
                                         "(untrained) retaining heads when --retaining_heads is "
                                         "unset.")


def policy(scorer: str, *, budget: int | None = None, compression: float | None = None,
           n_stabilizers: int | None = None) -> EvictionConfig:
  """The EvictionConfig of the flags for one scorer and budget (or compression)."""
  if n_stabilizers is None:
    n_stabilizers = STABILIZERS.value or 0
  return EvictionConfig(scorer=scorer, budget=budget, compression=compression,
                        chunk_size=CHUNK_SIZE.value, n_stabilizers=n_stabilizers,
                        n_sinks=SINKS.value, position_mode=POSITION_MODE.value,
                        local_len=LOCAL_LEN.value, decode_mode=DECODE_MODE.value,
                        snapkv_window=SNAPKV_WINDOW.value, snapkv_kernel=SNAPKV_KERNEL.value,
                        snapkv_pooling=SNAPKV_POOLING.value, seed=EVICTION_SEED.value)


def load_heads(model):
  """(heads, note): the retaining heads of --retaining_heads, fresh ones with
  --init_retaining_heads, or (None, why) when neither is given."""
  from flax import nnx

  from sparsejax.layers.retaining_heads import RetainingHeads, load_retaining_heads

  if RETAINING_HEADS.value:
    return load_retaining_heads(RETAINING_HEADS.value, model.config), (
        f"retaining heads from {RETAINING_HEADS.value}")
  if INIT_RETAINING_HEADS.value:
    return RetainingHeads(model.config, rngs=nnx.Rngs(0)), (
        "UNTRAINED retaining heads (--init_retaining_heads): a smoke test, not Locret")
  return None, ("no --retaining_heads given (train them with experiments.train_retaining_heads, "
                "or pass --init_retaining_heads for a smoke test)")
