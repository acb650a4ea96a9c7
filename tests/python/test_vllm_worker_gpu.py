"""kvdn's vLLM connector, worker side (python/kvdn/vllm_core.py WorkerCore), on a GPU with
PyTorch against a real kvdnd: engine A prefills a prompt and saves it; engine B, with its own
blocks and part of the prefix in its own prefix cache, loads the rest layer by layer, bit for bit,
without writing the blocks it already has; a chunk evicted between the lookup and the load shows
as failed blocks for vLLM to recompute; asynchronous saves let vLLM reuse the blocks at once. Skips without torch or a GPU (label `gpu`)."""

import os
import random
import subprocess
import unittest

import kvdn
from kvdn.vllm_core import SchedulerCore, WorkerCore, split_layer
from kvdnd_process import KvdndProcess

try:
    import torch

    HAVE_GPU = torch.cuda.is_available()
except ImportError:
    torch = None
    HAVE_GPU = False

LAYERS, HEADS, DIM, BLOCK, CHUNK, NUM_BLOCKS = 4, 8, 128, 16, 64, 128
MODEL = kvdn.ModelSpec("py-vllm-worker", LAYERS, HEADS, DIM, "bfloat16", tokens_per_chunk=CHUNK)


class Engine:
    """One vLLM-like engine: a FlashAttention-layout cache per layer, a scheduler core and a worker
    core over one kvdnd."""

    def __init__(self, daemon, ns, fill):
        shape = (2, NUM_BLOCKS, BLOCK, HEADS, DIM)
        if fill:
            self.kv = [torch.randn(shape, device="cuda").to(torch.bfloat16) for _ in range(LAYERS)]
        else:
            self.kv = [torch.zeros(shape, device="cuda", dtype=torch.bfloat16)
                       for _ in range(LAYERS)]
        self.client = kvdn.Client(MODEL, target=daemon.unix_target, namespace=ns)
        self.scheduler = SchedulerCore(self.client, BLOCK)
        self.connector = kvdn.KvConnector(self.client, host_staging_bytes=16 << 20,
                                          device_staging_bytes=8 << 20)
        ks, vs = [t[0] for t in self.kv], [t[1] for t in self.kv]
        self.worker = WorkerCore(self.connector, self.make_view, LAYERS, BLOCK,
                                 torch.device("cuda"))
        self._ks, self._vs = ks, vs

    def make_view(self, block_table):
        if isinstance(block_table, list):
            block_table = torch.tensor(block_table, dtype=torch.int32, device="cuda")
        return kvdn.PagedKvView.from_nhd(self._ks, self._vs, block_table)

    def step(self, new_reqs, num_scheduled, matched):
        """One engine step: the plan, the loads waited layer by layer, the saves."""
        for req_id, prompt, _, local in new_reqs:
            self.scheduler.after_alloc(req_id, matched.get(req_id, 0))
        plan = self.scheduler.plan(new_reqs, [], num_scheduled, set())
        self.worker.start_loads(plan)
        for layer in range(LAYERS):
            self.worker.wait_layer(layer)
        self.worker.finish_loads()
        for spec, result in self.worker.save(plan):
            if isinstance(result, Exception):
                raise result
        torch.cuda.synchronize()
        return plan

    def tokens_kv(self, blocks, n):
        pos = torch.arange(n, device="cuda")
        b = torch.tensor(blocks, device="cuda")[pos // BLOCK]
        s = pos % BLOCK
        return [(t[0][b, s], t[1][b, s]) for t in self.kv]

    def close(self):
        self.connector.close()
        self.client.close()


@unittest.skipUnless(HAVE_GPU, "needs PyTorch and a CUDA GPU")
class WorkerTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.daemon = KvdndProcess()
        cls.gpu_daemon = KvdndProcess(extra_args=["--gpu-tier-bytes", str(64 << 20)])

    @classmethod
    def tearDownClass(cls):
        cls.daemon.stop()
        cls.gpu_daemon.stop()

    def test_a_prefix_saved_by_one_engine_loads_into_another_past_its_own_cache(self):
        # Through host memory, and from kvdnd's GPU tier in place (its inject skips the -1 block
        # table entries as well).
        for daemon in (self.daemon, self.gpu_daemon):
            with self.subTest(gpu_tier=daemon is self.gpu_daemon):
                self.prefix_from_another_engine(daemon)

    def prefix_from_another_engine(self, daemon):
        ns = "vllm-worker-a"
        prompt = [random.Random(1).randrange(128000) for _ in range(CHUNK * 4 + 9)]
        a, b = Engine(daemon, ns, fill=True), Engine(daemon, ns, fill=False)
        try:
            blocks_a = random.Random(2).sample(range(NUM_BLOCKS), 17)
            self.assertEqual(a.scheduler.num_new_matched_tokens("r", prompt, 0), 0)
            plan = a.step([("r", prompt, blocks_a, 0)], {"r": len(prompt)}, {})
            self.assertEqual(len(plan.saves), 1)
            self.assertEqual(a.client.lookup(prompt), CHUNK * 4)

            # Engine B has the first chunk in its own prefix cache (blocks holding a sentinel).
            blocks_b = random.Random(3).sample(range(NUM_BLOCKS), 17)
            local = CHUNK
            for t in b.kv:
                t[:, blocks_b[:local // BLOCK]] = 7.0
            matched = b.scheduler.num_new_matched_tokens("s", prompt, local)
            self.assertEqual(matched, CHUNK * 3)
            # vLLM's NewRequestData counts the external tokens as computed.
            plan = b.step([("s", prompt, blocks_b, local + matched)],
                          {"s": len(prompt) - local - matched}, {"s": matched})
            self.assertEqual(len(plan.loads), 1)
            self.assertEqual(len(plan.saves), 1)  # stores nothing: every chunk is there
            self.assertEqual(b.worker.take_failed_blocks(), set())
            in_place = 4 if daemon is self.gpu_daemon else 0
            self.assertEqual([st.gpu_tier_chunks for st in b.worker.last_stats], [in_place])
            want = a.tokens_kv(blocks_a, CHUNK * 4)
            got = b.tokens_kv(blocks_b, CHUNK * 4)
            for layer in range(LAYERS):
                for which in (0, 1):
                    self.assertTrue(torch.all(got[layer][which][:local] == 7.0),
                                    f"layer {layer}: a block of vLLM's own cache was written")
                    self.assertTrue(torch.equal(got[layer][which][local:],
                                                want[layer][which][local:]),
                                    f"layer {layer} {'KV'[which]}")
        finally:
            a.close()
            b.close()

    def test_a_chunk_evicted_after_the_lookup_fails_its_blocks(self):
        ns = "vllm-worker-evict"
        prompt = [random.Random(4).randrange(128000) for _ in range(CHUNK * 3 + 1)]
        a, b = Engine(self.daemon, ns, fill=True), Engine(self.daemon, ns, fill=False)
        try:
            blocks_a = list(range(13))
            a.step([("r", prompt, blocks_a, 0)], {"r": len(prompt)}, {})
            matched = b.scheduler.num_new_matched_tokens("s", prompt, 0)
            self.assertEqual(matched, CHUNK * 3)
            r = subprocess.run([os.environ["KVDN_KVDNCTL"], "--target", self.daemon.unix_target,
                                "evict", "--namespace", ns], capture_output=True, text=True)
            self.assertEqual(r.returncode, 0, r.stderr)
            blocks_b = list(range(50, 63))
            plan = b.step([("s", prompt, blocks_b, matched)], {"s": 1}, {"s": matched})
            self.assertEqual(b.worker.take_failed_blocks(), set(blocks_b[:12]))
            self.assertEqual(b.worker.take_failed_blocks(), set())  # taken once
            # The step's save of the prompt was dropped: its blocks hold no KV (zeros here), and
            # storing them would serve garbage to every later request.
            self.assertEqual(len(plan.saves), 1)
            self.assertEqual(b.client.lookup(prompt), 0)
        finally:
            a.close()
            b.close()

    def test_asynchronous_saves_let_vllm_reuse_the_blocks_at_once(self):
        # wait_for_save with kvdn.async_save: the saves start, the next step overwrites every
        # block on the same stream at once, and what is stored is still the prompt's KV; a save
        # that cannot start (a block id outside the cache) is reported, the others go on.
        ns = "vllm-worker-async"
        prompts = [[random.Random(10 + i).randrange(128000) for _ in range(CHUNK * 3 + 5)]
                   for i in range(3)]
        a, b = Engine(self.daemon, ns, fill=True), Engine(self.daemon, ns, fill=False)
        try:
            blocks = [list(range(i * 20, i * 20 + 13)) for i in range(3)]
            new = [(f"r{i}", p, blk, 0) for i, (p, blk) in enumerate(zip(prompts, blocks))]
            for req_id, _, _, _ in new:
                a.scheduler.after_alloc(req_id, 0)
            plan = a.scheduler.plan(new, [], {f"r{i}": len(p) for i, p in enumerate(prompts)},
                                    set())
            self.assertEqual(len(plan.saves), 3)
            want = [a.tokens_kv(blk, CHUNK * 3) for blk in blocks]
            bad = plan.saves[2]
            plan.saves[2] = type(bad)(bad.req_id, bad.token_ids,
                                      list(bad.block_ids[:5]) + [NUM_BLOCKS] +
                                      list(bad.block_ids[6:]))  # a block outside the cache
            failed = a.worker.start_saves(plan)
            self.assertEqual([spec.req_id for spec, _ in failed], ["r2"])
            self.assertIsInstance(failed[0][1], kvdn.InvalidArgumentError)
            for t in a.kv:  # the next step, on the same stream
                t.fill_(-3.0)
            ended = a.worker.finish_saves()
            self.assertEqual(sorted(spec.req_id for spec, _ in ended), ["r0", "r1"])
            for spec, result in ended:
                self.assertIsInstance(result, kvdn.SaveResult, spec.req_id)
                self.assertEqual(result.chunks_stored, 3)  # whole chunks
            self.assertEqual(a.worker.reap_saves(), [])
            for i in range(2):
                blocks_b = list(range(100, 113))
                self.assertEqual(b.connector.load(prompts[i], b.make_view(blocks_b)).tokens,
                                 CHUNK * 3)
                got = b.tokens_kv(blocks_b, CHUNK * 3)
                for layer in range(LAYERS):
                    for which in (0, 1):
                        self.assertTrue(torch.equal(got[layer][which], want[i][layer][which]),
                                        f"prompt {i} layer {layer} {'KV'[which]}")
            self.assertEqual(a.client.lookup(prompts[2]), 0)
        finally:
            a.close()
            b.close()


@unittest.skipUnless(HAVE_GPU, "needs PyTorch and a CUDA GPU")
class SplitLayerTest(unittest.TestCase):
    """How vLLM's cache tensors are read (FlashAttention NHD or HND in memory, FlashInfer)."""

    def test_layouts(self):
        nb, bs, h, d = 6, 16, 4, 128
        nhd = torch.zeros(2, nb, bs, h, d, device="cuda", dtype=torch.bfloat16)
        k, v, layout = split_layer("l0", nhd)
        self.assertEqual((layout, tuple(k.shape)), ("nhd", (nb, bs, h, d)))
        self.assertEqual(v.data_ptr(), nhd[1].data_ptr())
        # vLLM's HND: memory [2, blocks, heads, block_size, dim] seen as [2, blocks, bs, heads, dim].
        phys = torch.zeros(2, nb, h, bs, d, device="cuda", dtype=torch.bfloat16)
        k, v, layout = split_layer("l1", phys.permute(0, 1, 3, 2, 4))
        self.assertEqual((layout, tuple(k.shape)), ("hnd", (nb, h, bs, d)))
        self.assertEqual((k.data_ptr(), v.data_ptr()), (phys[0].data_ptr(), phys[1].data_ptr()))
        combined = torch.zeros(nb, 2, bs, h, d, device="cuda", dtype=torch.bfloat16)
        self.assertEqual(split_layer("l2", combined)[2], "combined")
        for name, bad in [("mla", torch.zeros(nb, bs, 576, device="cuda")),
                          ("strided", nhd[:, :, :, :2])]:
            with self.subTest(name), self.assertRaises(ValueError) as e:
                split_layer(name, bad)
            self.assertIn(f"layer {name}'s KV cache has shape", str(e.exception))


if __name__ == "__main__":
    unittest.main()
