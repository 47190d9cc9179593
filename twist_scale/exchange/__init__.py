"""How values move between the groups' engines and the sharded central model (`exchange.base.Exchange`).

`packed` moves only the elements each group holds, planned as tensor arithmetic over every rank and
group (`held`); `full_width` moves whole tensors and is the reference the packed one is tested against.
"""

from __future__ import annotations

from twist_scale.central import CentralShards
from twist_scale.exchange.base import Exchange, SubnetSource
from twist_scale.exchange.entries import Entry
from twist_scale.exchange.full_width import FullWidthExchange
from twist_scale.exchange.packed import PackedExchange
from twist_scale.exchange.packed_plan import ShardRange

__all__ = ["Entry", "Exchange", "FullWidthExchange", "PackedExchange", "SubnetSource", "build_exchange"]


def build_exchange(kind: str, central: CentralShards, wire: str, shard_range: ShardRange | None) -> Exchange:
    """`--twist.aggregation`: 'packed' (the default) or 'dense' (the full-width reference, fp32 only)."""
    return PackedExchange(central, wire, shard_range) if kind == "packed" else FullWidthExchange(central)
