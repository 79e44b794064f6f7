"""Use a DeepSpeed ZeRO-3 partitioned lm_head weight outside its module's forward.

Under ZeRO-3 every rank holds a 1/world_size shard of each parameter; ``param.data`` is an
empty tensor (``numel() == 0``, true shape in ``param.ds_shape``) except while a module
hook, or ``deepspeed.zero.GatheredParameters``, has all-gathered it. A fused head reads
``lm_head.weight`` directly and never calls the ``lm_head`` module. Inside the DeepSpeed
engine's forward that is still fine: DeepSpeed gathers a parameter read by attribute and
registers it as external to the running module, which keeps it through the backward.
Outside it (a loss computed after ``engine(...)`` returns, as in TRL issue 4544 with
Liger's fused DPO loss) four things go wrong, each reproduced by tests/kernels:

1. the forward matmul sees the empty shard;
2. autograd sizes the weight's gradient slot when the graph node is built, so a node built
   on the shard rejects a [V, H] gradient ("expected shape compatible with [0]");
3. the backward needs the full weight again, after it was re-partitioned;
4. autograd lays the accumulated gradient out like ``param.data``; if that is the shard by
   then, accumulation fails ("The size of tensor a (0) must match the size of tensor b (H)").

``fused_linear_token_logprobs`` enters ``gathered_weight`` around building the node (1, 2)
and in its backward (3), and calls ``hold_gathered_for_accumulation`` (4). The gradient
goes to the ``Parameter`` itself, so ZeRO-3's own post-accumulate hook reduce-scatters it
into each rank's partition like any other gradient. Each call gathers a fixed number of
times whatever its token count, so ranks with different numbers of valid tokens (or none)
issue the same collectives (TRL issue 6696 hung when per-chunk gathers differed).

Tied embeddings (SmolLM2): ``lm_head.weight is embed_tokens.weight``; gathering is by
parameter, and autograd sums the embedding's and the head's gradients before
accumulating once.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch


def is_zero3_param(param: torch.Tensor) -> bool:
    """True for a parameter managed by DeepSpeed ZeRO-3 (it carries ``ds_id``)."""
    return hasattr(param, "ds_id")


def needs_gather(param: torch.Tensor) -> bool:
    """True if ``param`` is a ZeRO-3 parameter whose full data is not materialised now."""
    if not is_zero3_param(param):
        return False
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    return param.ds_status != ZeroParamStatus.AVAILABLE


@contextmanager
def gathered_weight(param: torch.Tensor) -> Iterator[torch.Tensor]:
    """Yield ``param`` with its full data inside the block (a no-op outside ZeRO-3).

    Re-entrant: DeepSpeed refuses nested ``GatheredParameters`` on one parameter, so an
    already materialised parameter (an outer ``gathered_weight``, a persistent small
    parameter, or a tied embedding still held by its module) is yielded as it is.
    Read-only (``modifier_rank=None``): nothing is broadcast on exit, the gathered copy is
    simply released. Use the yielded object itself in autograd so gradients reach ZeRO.
    ``fused_linear_token_logprobs`` calls this itself; other direct reads of a partitioned
    weight need it too, e.g. ``with gathered_weight(head.weight) as w: norms = w.norm(dim=1)``.
    """
    if not needs_gather(param):
        yield param
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
        yield param


def hold_gathered_for_accumulation(param: torch.Tensor) -> None:
    """Make sure a ZeRO-3 ``param`` is materialised when autograd accumulates its next gradient.

    Call this from a backward that returns a gradient for ``param``. Autograd accumulates
    that gradient in a separate node *after* the backward returns, laying it out like
    ``param.data``; if the parameter has been re-partitioned by then (``data`` is an
    empty [0] shard), accumulation fails with "The size of tensor a (0) must match the size
    of tensor b (H)" (failure 4 above).

    So: a one-shot hook gathers the parameter just before accumulation when it is not
    materialised, and a post-accumulate hook releases it right after. ZeRO's own
    post-accumulate hook, registered at ``deepspeed.initialize``, runs first and
    reduce-scatters the full gradient while the parameter is still gathered, as in a
    normal module backward. The hooks are removed when the backward pass ends.
    """
    if not is_zero3_param(param) or not param.requires_grad:
        return
    import deepspeed

    opened = []

    def gather_before_accumulate(grad):
        if not opened and needs_gather(param):
            context = deepspeed.zero.GatheredParameters([param], modifier_rank=None)
            context.__enter__()
            opened.append(context)
        return grad

    def release_after_accumulate(_param):
        while opened:
            opened.pop().__exit__(None, None, None)

    handles = [
        param.register_hook(gather_before_accumulate),
        param.register_post_accumulate_grad_hook(release_after_accumulate),
    ]

    def remove_hooks():
        release_after_accumulate(param)
        for handle in handles:
            handle.remove()

    # Removing a hook from inside it would edit the hook dict while autograd iterates it.
    torch.autograd.Variable._execution_engine.queue_callback(remove_hooks)

