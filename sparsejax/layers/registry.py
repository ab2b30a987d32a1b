"""Name -> class registries for the model's attention and FFN slots.

A new attention or FFN kind registers itself here and is chosen by name from the config
(`attention="dense"`, `ffn="swiglu"`), without touching the model file.
"""
ATTENTION_KINDS: dict[str, type] = {}
FFN_KINDS: dict[str, type] = {}


def register_attention(name: str):
  def wrap(cls):
    ATTENTION_KINDS[name] = cls
    return cls
  return wrap


def register_ffn(name: str):
  def wrap(cls):
    FFN_KINDS[name] = cls
    return cls
  return wrap


def lookup(registry: dict[str, type], name: str, slot: str) -> type:
  if name not in registry:
    raise ValueError(f"ModelConfig.{slot}={name!r} is not registered; known: {sorted(registry)}")
  return registry[name]
