"""kvdn as a vLLM (v1) KV connector: a request's prompt prefix stored by any engine is loaded into
vLLM's paged cache layer by layer, and each prompt's KV is saved once prefill has computed it.

    vllm serve meta-llama/Llama-3.1-8B --kv-transfer-config '{
      "kv_connector": "KvdnConnector", "kv_connector_module_path": "kvdn.vllm",
      "kv_role": "kv_both",
      "kv_connector_extra_config": {"kvdn.namespace": "tenant-a"}}'

Extra config (all optional): kvdn.target (default $KVDN_TARGET, else the node's kvdnd socket),
kvdn.namespace ("default"), kvdn.token (default $KVDN_TOKEN / $KVDN_TOKEN_FILE),
kvdn.tokens_per_chunk (256; a multiple of the block size), kvdn.model_name (default the served
model; engines share chunks only under the same name), kvdn.load / kvdn.save (true),
kvdn.async_save (true: wait_for_save returns once the saves' gathers are enqueued, ahead of the
next step's work on the stream, and the stores into kvdnd run behind the next steps),
kvdn.use_gpu_tier (true), kvdn.map_host_tier (true: load chunks straight out of the host tier of a
kvdnd run with share_host_tier), kvdn.host_staging_mib (512), kvdn.device_staging_mib (256).

What it decides is in kvdn/vllm_core.py (tested with a real kvdnd and GPU cache: tests/python);
this module maps vLLM's objects onto it. vLLM's connector interface is marked experimental and
changes between releases: this module follows vLLM's v1 `KVConnectorBase_V1` (constructor with
kv_cache_config; NewRequestData.block_ids per KV cache group; CachedRequestData.resumed_req_ids),
and was written against vLLM's source, not run inside a vLLM server (none could be installed
where it was built). Supported: one KV cache group (standard attention), FlashAttention's
[2, blocks, block_size, heads, dim] (NHD or HND in memory) and FlashInfer's [blocks, 2, ...]
layouts, tensor parallelism (each rank stores its heads under its own model name), no pipeline
parallelism, no MLA.
"""

import logging

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (KVConnectorBase_V1,
                                                               KVConnectorMetadata,
                                                               KVConnectorRole)

from .client import Client, ModelSpec
from .connector import KvConnector, PagedKvView
from .errors import KvdnError
from .vllm_core import SchedulerCore, StepPlan, WorkerCore, order_layers, split_layer

logger = logging.getLogger("kvdn.vllm")


class KvdnConnectorMetadata(KVConnectorMetadata):
    def __init__(self, plan):
        self.plan = plan


def _extra(kv_transfer_config, key, default):
    value = kv_transfer_config.get_from_extra_config(key, default)
    if isinstance(default, bool) and isinstance(value, str):
        return value.lower() in ("1", "true", "yes", "on")
    return type(default)(value) if default is not None and value is not None else value


def _model_spec(vllm_config, kv_transfer_config, tp_rank):
    mc, pc, cc = vllm_config.model_config, vllm_config.parallel_config, vllm_config.cache_config
    if pc.pipeline_parallel_size != 1:
        raise ValueError("kvdn's vLLM connector does not support pipeline parallelism")
    dtype = mc.dtype if cc.cache_dtype in (None, "auto") else cc.cache_dtype
    name = _extra(kv_transfer_config, "kvdn.model_name", None) or mc.model
    tp = pc.tensor_parallel_size
    return ModelSpec(f"{name}|tp{tp_rank}/{tp}", mc.get_num_layers(pc),
                     mc.get_num_kv_heads(pc), mc.get_head_size(), str(dtype),
                     _extra(kv_transfer_config, "kvdn.tokens_per_chunk", 256))


class KvdnConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config, role, kv_cache_config=None):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        cfg = self._kv_transfer_config
        self._block_size = vllm_config.cache_config.block_size
        self._load = _extra(cfg, "kvdn.load", True)
        self._save = _extra(cfg, "kvdn.save", True)
        self._async_save = _extra(cfg, "kvdn.async_save", True)
        if role == KVConnectorRole.SCHEDULER:
            # The scheduler looks up rank 0's chunks: every rank saves its own in the same step.
            spec = _model_spec(vllm_config, cfg, 0)
            self._client = Client(spec, target=_extra(cfg, "kvdn.target", None),
                                  namespace=_extra(cfg, "kvdn.namespace", "default"),
                                  token=_extra(cfg, "kvdn.token", None))
            self._scheduler = SchedulerCore(self._client, self._block_size, save=self._save,
                                            load=self._load)
        else:
            from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

            self._spec = _model_spec(vllm_config, cfg, get_tensor_model_parallel_rank())
            self._worker = None
            self._layer_of = {}

    # ---- worker side ----

    def register_kv_caches(self, kv_caches):
        cfg = self._kv_transfer_config
        names = order_layers(kv_caches)
        ks, vs, layouts = [], [], set()
        for name in names:
            k, v, layout = split_layer(name, kv_caches[name])
            ks.append(k)
            vs.append(v)
            layouts.add(layout)
        if len(layouts) != 1:
            raise ValueError(f"kvdn: layers have different cache layouts {sorted(layouts)}")
        layout = layouts.pop()
        first = ks[0]
        heads, dim = (first.shape[1], first.shape[3]) if layout == "hnd" else \
            (first.shape[-2], first.shape[-1])
        spec = self._spec
        if (len(names), heads, dim) != (spec.num_layers, spec.num_kv_heads, spec.head_dim) or \
                str(first.dtype) != f"torch.{str(spec.dtype).replace('torch.', '')}":
            raise ValueError(f"kvdn: the worker's KV cache ({len(names)} layers, {heads} kv "
                             f"heads, head_dim {dim}, {first.dtype}) is not the model the "
                             f"scheduler looks up ({spec})")
        self._layer_of = {name: i for i, name in enumerate(names)}
        client = Client(spec, target=_extra(cfg, "kvdn.target", None),
                        namespace=_extra(cfg, "kvdn.namespace", "default"),
                        token=_extra(cfg, "kvdn.token", None),
                        receive_pool_bytes=_extra(cfg, "kvdn.host_staging_mib", 512) << 20)
        connector = KvConnector(
            client, use_gpu_tier=_extra(cfg, "kvdn.use_gpu_tier", True),
            map_host_tier=_extra(cfg, "kvdn.map_host_tier", True),
            host_staging_bytes=_extra(cfg, "kvdn.host_staging_mib", 512) << 20,
            device_staging_bytes=_extra(cfg, "kvdn.device_staging_mib", 256) << 20)

        def make_view(block_table):
            if layout == "nhd":
                return PagedKvView.from_nhd(ks, vs, block_table)
            if layout == "hnd":
                return PagedKvView.from_hnd(ks, vs, block_table)
            return PagedKvView.from_nhd_combined(ks, block_table)

        self._client = client
        self._worker = WorkerCore(connector, make_view, len(names), self._block_size,
                                  first.device)

    def start_load_kv(self, forward_context, **kwargs):
        meta = self._get_connector_metadata()
        if self._worker is not None and isinstance(meta, KvdnConnectorMetadata):
            self._worker.start_loads(meta.plan)

    def wait_for_layer_load(self, layer_name):
        if self._worker is not None and layer_name in self._layer_of:
            self._worker.wait_layer(self._layer_of[layer_name], torch.cuda.current_stream())

    def save_kv_layer(self, layer_name, kv_layer, attn_metadata, **kwargs):
        return  # a chunk holds every layer: saved whole in wait_for_save

    def wait_for_save(self):
        meta = self._get_connector_metadata() if self.has_connector_metadata() else None
        if self._worker is None:
            return
        self._worker.finish_loads()
        results = self._worker.reap_saves()
        if isinstance(meta, KvdnConnectorMetadata) and meta.plan.saves:
            stream = torch.cuda.current_stream()
            if self._async_save:  # the gather is ordered before the next step's work on stream
                results += self._worker.start_saves(meta.plan, stream)
            else:
                results += self._worker.save(meta.plan, stream)
        for spec, result in results:
            if isinstance(result, Exception):  # a lost save is a future cache miss
                logger.warning("kvdn: saving request %s failed: %s", spec.req_id, result)

    def shutdown(self):
        if self._worker is not None:
            for spec, result in self._worker.finish_saves():
                if isinstance(result, Exception):
                    logger.warning("kvdn: saving request %s failed: %s", spec.req_id, result)

    def get_block_ids_with_load_errors(self):
        return self._worker.take_failed_blocks() if self._worker is not None else set()

    @classmethod
    def requires_piecewise_for_cudagraph(cls, extra_config):
        return True  # wait_for_layer_load runs between attention layers

    # ---- scheduler side ----

    def get_num_new_matched_tokens(self, request, num_computed_tokens):
        try:
            n = self._scheduler.num_new_matched_tokens(
                request.request_id, request.prompt_token_ids or [], num_computed_tokens)
        except KvdnError as e:  # kvdn unreachable: serve without it
            logger.warning("kvdn: lookup failed, computing the prompt: %s", e)
            n = 0
        return n, False

    def update_state_after_alloc(self, request, blocks, num_external_tokens):
        self._scheduler.after_alloc(request.request_id, num_external_tokens)

    def build_connector_meta(self, scheduler_output):
        new = [(r.req_id, r.prompt_token_ids, r.block_ids[0], r.num_computed_tokens)
               for r in scheduler_output.scheduled_new_reqs]
        c = scheduler_output.scheduled_cached_reqs
        resumed = getattr(c, "resumed_req_ids", set())
        cached = [(rid, None if nb is None else nb[0], rid in resumed, nc)
                  for rid, nb, nc in zip(c.req_ids, c.new_block_ids, c.num_computed_tokens)]
        plan = self._scheduler.plan(new, cached, scheduler_output.num_scheduled_tokens,
                                    scheduler_output.finished_req_ids)
        return KvdnConnectorMetadata(plan)

    def request_finished(self, request, block_ids):
        # The blocks may be freed at once: a save's gather out of them is ordered before the next
        # step's work on the stream (kvdn.async_save), or done within the step.
        return False, None


__all__ = ["KvdnConnector", "KvdnConnectorMetadata", "StepPlan"]
