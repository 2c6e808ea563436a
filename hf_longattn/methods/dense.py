"""`dense`: exact attention through the patched path, the reference that every sparse method is compared with."""

from ..kernels import dense_attention
from .base import SparseMethod


class Dense(SparseMethod):
    name = "dense"
    supports_query_offset = True

    def attend(self, query, key, value, call):
        return dense_attention(query, key, value, scale=call.scale, softcap=call.softcap, kv_start=call.kv_start,
                               q_offset=call.q_offset)
