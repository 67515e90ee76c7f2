"""CoLM: the chain-aware decoder every system of this codebase runs on.

`Decoder(ModelConfig.tiny(), rngs=nnx.Rngs(0))(tokens)` -> logits [B, T, V]; chains=(1,) is the
standard LLaMA-style Transformer, chains=(16, 16) or (8, 8, 8, 8) is Chain-of-Model.
"""

from colm.attention import decode_attention, get_attention, reference_attention, register_attention
from colm.config import ModelConfig, resolve_dtype
from colm.layers import ChainLinear, ChainRMSNorm, rope
from colm.model import Attention, Block, Decoder, FeedForward

__all__ = [
    "Attention", "Block", "ChainLinear", "ChainRMSNorm", "Decoder", "FeedForward", "ModelConfig",
    "decode_attention", "get_attention", "reference_attention", "register_attention",
    "resolve_dtype", "rope",
]
