"""Pallas kernels: block-sparse flash attention, decode and prefill attention over the KV cache
layout, log-sum-exp merge."""

from pallas_kernels.block_sparse import BlockSparseTiles as BlockSparseTiles
from pallas_kernels.block_sparse import block_sparse_attention as block_sparse_attention
from pallas_kernels.block_sparse import (
    block_sparse_attention_reference as block_sparse_attention_reference,
)
from pallas_kernels.decode import cache_decode_attention as cache_decode_attention
from pallas_kernels.decode import (
    cache_decode_attention_reference as cache_decode_attention_reference,
)
from pallas_kernels.decode import paged_decode_attention as paged_decode_attention
from pallas_kernels.decode import paged_decode_attention_parts as paged_decode_attention_parts
from pallas_kernels.decode import pick_block_size as pick_block_size
from pallas_kernels.decode import supports as supports
from pallas_kernels.layouts import causal_layout as causal_layout
from pallas_kernels.layouts import s2_layout as s2_layout
from pallas_kernels.layouts import token_mask as token_mask
from pallas_kernels.merge import merge_attention as merge_attention
from pallas_kernels.merge import merge_attention_reference as merge_attention_reference
from pallas_kernels.prefill import cache_prefill_attention as cache_prefill_attention
from pallas_kernels.prefill import (
    cache_prefill_attention_reference as cache_prefill_attention_reference,
)
