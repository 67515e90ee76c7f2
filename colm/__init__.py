"""CoLM: the chain-aware decoder every system of this codebase runs on.

`Decoder(ModelConfig.tiny(), rngs=nnx.Rngs(0))(tokens)` -> logits [B, T, V]; chains=(1,) is the
standard LLaMA-style Transformer, chains=(16, 16) or (8, 8, 8, 8) is Chain-of-Model, air=True is
CoLM-Air. colm.colm holds the method: multi-scale loss, progressive expansion with frozen old
chains, sub-model extraction.
"""

from colm.attention import (
    AttentionImpl,
    get_attention,
    get_attention_impl,
    reference_attention,
    register_attention,
)
from colm.colm import (
    build_model,
    expand,
    expanded_config,
    extract,
    freeze,
    multiscale_loss,
    multiscale_losses,
    sub_config,
    trainable_mask,
)
from colm.config import ModelConfig, resolve_dtype
from colm.layers import ChainLinear, ChainRMSNorm, rope
from colm.mesh import cache_shardings, make_mesh, tree_shardings
from colm.model import Attention, Block, Decoder, FeedForward

__all__ = [
    "Attention", "AttentionImpl", "Block", "ChainLinear", "ChainRMSNorm", "Decoder", "FeedForward",
    "ModelConfig", "build_model", "cache_shardings", "expand", "expanded_config", "extract",
    "freeze", "get_attention", "get_attention_impl", "make_mesh", "multiscale_loss",
    "multiscale_losses", "reference_attention", "register_attention", "resolve_dtype", "rope",
    "sub_config", "trainable_mask", "tree_shardings",
]
