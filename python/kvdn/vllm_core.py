"""What kvdn's vLLM connector (kvdn/vllm.py) decides, apart from vLLM's own classes, so that it is
tested against a real kvdnd and a real GPU cache without vLLM installed:

- SchedulerCore (vLLM's scheduler process): how many tokens of a new request kvdn can supply
  beyond vLLM's own prefix cache, and, each step, which requests load (into which blocks) and
  which save (their prompt's whole chunks, once prefill has computed them).
- WorkerCore (each GPU worker): runs those loads into the paged cache layer by layer and the saves
  after the forward pass; reports the blocks a load could not fill, so vLLM recomputes them.

Alignment. kvdn stores chunks of tokens_per_chunk tokens (a multiple of vLLM's block size); a
request's external tokens always end on a chunk boundary, since only whole chunks of a prompt
match another prompt. vLLM must compute at least one prompt token itself, so a prompt stored
whole is offered up to its last chunk boundary before its last token.

Blocks vLLM already has (its prefix cache hit, `num_computed_tokens`) may be shared with running
requests: a load never writes them (their block-table entries are given as -1, which the inject
kernels skip), although the chunks covering them are fetched with the rest.
"""

import re
from dataclasses import dataclass, field


@dataclass
class LoadSpec:
    """Load tokens [0, len(token_ids)) of a request into block_ids, writing no block before
    skip_blocks."""
    req_id: str
    token_ids: list
    block_ids: list
    skip_blocks: int


@dataclass
class SaveSpec:
    """Save the KV of token_ids (whole chunks) from block_ids."""
    req_id: str
    token_ids: list
    block_ids: list


@dataclass
class StepPlan:
    loads: list = field(default_factory=list)
    saves: list = field(default_factory=list)


class _Req:
    __slots__ = ("prompt", "block_ids", "saved")

    def __init__(self, prompt, block_ids):
        self.prompt = prompt
        self.block_ids = block_ids
        self.saved = False


class SchedulerCore:
    """Not thread-safe (vLLM's scheduler calls it from one thread)."""

    def __init__(self, client, block_size, save=True, load=True):
        tpc = client.model.tokens_per_chunk
        if tpc % block_size != 0:
            raise ValueError(f"kvdn tokens_per_chunk {tpc} is not a multiple of vLLM's block "
                             f"size {block_size}")
        self.client = client
        self.block_size = block_size
        self.tokens_per_chunk = tpc
        self.save = save
        self.load = load
        self._local = {}          # req_id -> num_computed_tokens its last match was asked with
        self._pending_loads = {}  # req_id -> (num_local, num_external), until the next plan
        self._reqs = {}           # req_id -> _Req, from its first step until it finishes

    def num_new_matched_tokens(self, req_id, prompt, num_computed_tokens):
        """Tokens of `prompt` past num_computed_tokens that kvdn can load (0 when none; a multiple
        of tokens_per_chunk minus the local part). vLLM may ask again: it only notes the local
        count for after_alloc."""
        self._local[req_id] = num_computed_tokens
        if not self.load or len(prompt) < self.tokens_per_chunk + 1:
            return 0
        stored = self.client.lookup(prompt)
        # Whole chunks only, and at least the last prompt token left for vLLM to compute.
        usable = min(stored, len(prompt) - 1)
        usable -= usable % self.tokens_per_chunk
        return max(0, usable - num_computed_tokens)

    def after_alloc(self, req_id, num_external_tokens):
        """vLLM allocated blocks for the request's external tokens (0: nothing to load)."""
        local = self._local.pop(req_id, 0)
        if num_external_tokens > 0:
            self._pending_loads[req_id] = (local, num_external_tokens)
        else:
            self._pending_loads.pop(req_id, None)

    def plan(self, new_reqs, cached_reqs, num_scheduled_tokens, finished_req_ids):
        """This step's loads and saves.

        new_reqs: (req_id, prompt_token_ids, block_ids, num_computed_tokens) of requests scheduled
          for the first time (block_ids: the request's blocks of its one KV cache group).
        cached_reqs: (req_id, new_block_ids or None, resumed, num_computed_tokens) of requests
          scheduled before (new blocks are appended; a resumed request's replace its blocks).
        num_scheduled_tokens: req_id -> tokens computed this step.
        """
        plan = StepPlan()
        for req_id in finished_req_ids:
            self._reqs.pop(req_id, None)
            self._pending_loads.pop(req_id, None)
            self._local.pop(req_id, None)
        for req_id, prompt, block_ids, num_computed in new_reqs:
            prompt = list(prompt or [])
            req = _Req(prompt, list(block_ids))
            self._reqs[req_id] = req
            pending = self._pending_loads.pop(req_id, None)
            if pending is not None:
                local, external = pending
                end = local + external
                plan.loads.append(LoadSpec(req_id, prompt[:end],
                                           req.block_ids[:_blocks(end, self.block_size)],
                                           local // self.block_size))
            self._maybe_save(plan, req_id, req, num_computed, num_scheduled_tokens)
        for req_id, new_block_ids, resumed, num_computed in cached_reqs:
            req = self._reqs.get(req_id)
            if req is None:
                continue
            if new_block_ids is not None:
                if resumed:
                    req.block_ids = list(new_block_ids)
                else:
                    req.block_ids.extend(new_block_ids)
            self._maybe_save(plan, req_id, req, num_computed, num_scheduled_tokens)
        return plan

    def _maybe_save(self, plan, req_id, req, num_computed, num_scheduled_tokens):
        if not self.save or req.saved:
            return
        done = num_computed + num_scheduled_tokens.get(req_id, 0)
        if done < len(req.prompt):
            return  # prefill not finished: save once it is
        req.saved = True
        whole = len(req.prompt) - len(req.prompt) % self.tokens_per_chunk
        if whole == 0:
            return
        plan.saves.append(SaveSpec(req_id, req.prompt[:whole],
                                   req.block_ids[:_blocks(whole, self.block_size)]))


def _blocks(tokens, block_size):
    return (tokens + block_size - 1) // block_size


class WorkerCore:
    """One worker's loads and saves over a kvdn.KvConnector. `make_view(block_table)` returns a
    kvdn.PagedKvView of the worker's whole cache (every layer, in order) through that block table.
    Not thread-safe (vLLM's model runner calls it from one thread)."""

    def __init__(self, connector, make_view, num_layers, block_size, device):
        self.connector = connector
        self.make_view = make_view
        self.num_layers = num_layers
        self.block_size = block_size
        self.device = device
        self._loads = []      # (LoadSpec, kvdn.PagedLoad) of this step
        self._failed = set()  # block ids a load could not fill, until taken
        self._failed_reqs = set()  # requests whose load failed this step: not saved
        self._saving = []     # (SaveSpec, kvdn.PagedSave) started and not yet reaped
        self.last_stats = []  # kvdn.LoadStats of the last finished step's loads, for logs

    def _table(self, block_ids, skip_blocks=0):
        import torch

        ids = list(block_ids)
        for i in range(min(skip_blocks, len(ids))):
            ids[i] = -1  # not written: vLLM's own (possibly shared) block
        return torch.tensor(ids, dtype=torch.int32, device=self.device)

    def start_loads(self, plan):
        """Starts this step's loads (in order, on the connector's stream); returns at once."""
        self.finish_loads()
        self._failed_reqs = set()
        for spec in plan.loads:
            try:
                view = self.make_view(self._table(spec.block_ids, spec.skip_blocks))
                self._loads.append((spec, self.connector.start_load(spec.token_ids, view)))
            except Exception:
                self._fail(spec, spec.skip_blocks)

    def _fail(self, spec, first_bad_block):
        self._failed.update(spec.block_ids[first_bad_block:])
        self._failed_reqs.add(spec.req_id)

    def wait_layer(self, layer, stream=None):
        """Orders `stream` (default: torch's current) after every load's copies of `layer`. A load
        that failed is dropped here; its blocks are reported by finish_loads."""
        kept = []
        for spec, load in self._loads:
            try:
                load.wait_layer(layer, stream)
                kept.append((spec, load))
            except Exception:
                self._fail(spec, spec.skip_blocks)
                load.close()
        self._loads = kept

    def finish_loads(self):
        """Waits for this step's loads; the blocks that did not get their KV (a chunk evicted since
        the lookup, a checksum failure, kvdnd gone) join the failed set."""
        self.last_stats = []
        for spec, load in self._loads:
            try:
                result = load.wait()
                loaded = result.tokens
                self.last_stats.append(load.stats())
            except Exception:
                loaded = 0
            finally:
                load.close()
            if loaded < len(spec.token_ids):
                self._fail(spec, max(loaded // self.block_size, spec.skip_blocks))
        self._loads = []

    def take_failed_blocks(self):
        failed, self._failed = self._failed, set()
        return failed

    def save(self, plan, stream=None):
        """Stores each SaveSpec's chunks from the cache once the work on `stream` so far (the
        forward pass) is done; blocks until stored. Returns (SaveSpec, kvdn.SaveResult or the
        exception) per save attempted: a failed save loses only that cache entry, so the caller
        logs it and goes on. A request whose load failed this step is not saved: its failed blocks
        hold no KV until vLLM recomputes them (call finish_loads first)."""
        started = self.start_saves(plan, stream)
        return started + self.finish_saves()

    def start_saves(self, plan, stream=None):
        """save() without waiting for the stores: each save's gather out of the cache is ordered
        before what is enqueued next on `stream` (default: torch's current), so vLLM may free or
        reuse the blocks at once; the stores run behind (reap them with reap_saves). Returns
        (SaveSpec, exception) for the saves that failed to start."""
        failed = []
        for spec in plan.saves:
            if spec.req_id in self._failed_reqs:
                continue
            try:
                view = self.make_view(self._table(spec.block_ids))
                self._saving.append((spec, self.connector.start_save(spec.token_ids, view,
                                                                     stream)))
            except Exception as e:  # noqa: BLE001 — reported to the caller, per request
                failed.append((spec, e))
        return failed

    def reap_saves(self):
        """(SaveSpec, kvdn.SaveResult or the exception) of the started saves that have ended;
        never blocks."""
        ended, running = [], []
        for spec, save in self._saving:
            (ended if save.done() else running).append((spec, save))
        self._saving = running
        return [(spec, self._result(save)) for spec, save in ended]

    def finish_saves(self):
        """Waits for every started save; their (SaveSpec, result or exception)."""
        saving, self._saving = self._saving, []
        return [(spec, self._result(save)) for spec, save in saving]

    @staticmethod
    def _result(save):
        try:
            return save.wait()
        except Exception as e:  # noqa: BLE001 — reported to the caller, per request
            return e
        finally:
            save.close()


def order_layers(kv_caches):
    """vLLM's layer names (dict keys, e.g. "model.layers.12.self_attn.attn") in model order: by
    the first number between dots, names without one in their given order."""
    names = list(kv_caches)

    def key(item):
        i, name = item
        m = re.search(r"\.(\d+)\.", name)
        return (int(m.group(1)) if m else -1, i)

    return [name for _, name in sorted(enumerate(names), key=key)]


def split_layer(name, t):
    """(k, v, layout) of one layer's vLLM cache tensor, for kvdn.PagedKvView: FlashAttention's
    [2, blocks, block_size, heads, dim] with NHD in memory ("nhd": k, v [blocks, block_size, heads,
    dim]) or HND in memory ("hnd": k, v [blocks, heads, block_size, dim]); FlashInfer's
    [blocks, 2, block_size, heads, dim] ("combined": the tensor, None). ValueError otherwise (MLA's
    [blocks, block_size, dim], other strides), naming the layer, shape and strides."""
    if t.dim() == 5 and t.shape[0] == 2:
        k, v = t[0], t[1]
        if k.is_contiguous() and v.is_contiguous():
            return k, v, "nhd"
        kh, vh = k.permute(0, 2, 1, 3), v.permute(0, 2, 1, 3)
        if kh.is_contiguous() and vh.is_contiguous():
            return kh, vh, "hnd"
    elif t.dim() == 5 and t.shape[1] == 2 and t.is_contiguous():
        return t, None, "combined"
    raise ValueError(f"kvdn: layer {name}'s KV cache has shape {tuple(t.shape)} and strides "
                     f"{t.stride()}; kvdn reads [2, blocks, block_size, heads, dim] (NHD or HND "
                     f"in memory) or [blocks, 2, block_size, heads, dim]")
