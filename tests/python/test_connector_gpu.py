"""kvdn.KvConnector (python/kvdn/connector.py, over libkvdn_c.so) on a GPU with PyTorch, against a
real kvdnd: a request's KV saved from one paged cache and loaded into another, layer by layer, bit
for bit, in each layout an engine uses; the bytes kvdnd stored are the chunk format's; bad views
get precise errors. Skips without torch or a GPU (ctest label `gpu`)."""

import contextlib
import random
import unittest

import kvdn
from kvdnd_process import KvdndProcess

try:
    import torch

    HAVE_GPU = torch.cuda.is_available()
except ImportError:  # CI and this VM: no torch
    torch = None
    HAVE_GPU = False

LAYERS, HEADS, DIM, BLOCK, CHUNK = 3, 4, 128, 16, 64
NUM_BLOCKS = 64


def model(dtype):
    return kvdn.ModelSpec(f"py-gpu-{dtype}", LAYERS, HEADS, DIM, dtype, tokens_per_chunk=CHUNK)


class Cache:
    """An engine's paged cache in one layout, random or zero, and a random block table."""

    def __init__(self, layout, dtype, fill, seed, num_tokens):
        g = torch.Generator(device="cuda").manual_seed(seed)
        self.layout = layout
        shape = {
            "vllm": (2, NUM_BLOCKS, BLOCK, HEADS, DIM),
            "nhd": (NUM_BLOCKS, BLOCK, HEADS, DIM),
            "nhd_combined": (NUM_BLOCKS, 2, BLOCK, HEADS, DIM),
            "hnd": (NUM_BLOCKS, HEADS, BLOCK, DIM),
        }[layout]
        tdtype = getattr(torch, dtype)

        def make():
            if fill:
                return torch.randn(shape, generator=g, device="cuda", dtype=torch.float32).to(tdtype)
            return torch.zeros(shape, device="cuda", dtype=tdtype)

        if layout in ("nhd", "hnd"):
            self.k = [make() for _ in range(LAYERS)]
            self.v = [make() for _ in range(LAYERS)]
        else:
            self.kv = [make() for _ in range(LAYERS)]
        blocks = (num_tokens + BLOCK - 1) // BLOCK
        perm = list(range(NUM_BLOCKS))
        random.Random(seed).shuffle(perm)
        self.used = perm[:blocks]
        self.block_table = torch.tensor(self.used, dtype=torch.int32, device="cuda")

    def view(self):
        if self.layout == "vllm":
            return kvdn.PagedKvView.from_vllm(self.kv, self.block_table)
        if self.layout == "nhd_combined":
            return kvdn.PagedKvView.from_nhd_combined(self.kv, self.block_table)
        if self.layout == "nhd":
            return kvdn.PagedKvView.from_nhd(self.k, self.v, self.block_table)
        return kvdn.PagedKvView.from_hnd(self.k, self.v, self.block_table)

    def gather(self, layer, n):
        """(K, V) of positions [0, n) of `layer`, each [n, HEADS, DIM]."""
        pos = torch.arange(n, device="cuda")
        blocks = self.block_table.long()[pos // BLOCK]
        slots = pos % BLOCK
        if self.layout == "vllm":
            kv = self.kv[layer]
            return kv[0][blocks, slots], kv[1][blocks, slots]
        if self.layout == "nhd_combined":
            kv = self.kv[layer]
            return kv[blocks, 0, slots], kv[blocks, 1, slots]
        if self.layout == "nhd":
            return self.k[layer][blocks, slots], self.v[layer][blocks, slots]
        return self.k[layer][blocks, :, slots], self.v[layer][blocks, :, slots]

    def untouched_blocks_are_zero(self):
        rest = [b for b in range(NUM_BLOCKS) if b not in set(self.used)]
        idx = torch.tensor(rest, device="cuda")
        tensors = self.kv if self.layout in ("vllm", "nhd_combined") else self.k + self.v
        for t in tensors:
            picked = t[:, idx] if self.layout == "vllm" else t[idx]
            if torch.count_nonzero(picked).item() != 0:
                return False
        return True


@unittest.skipUnless(HAVE_GPU, "needs PyTorch and a CUDA GPU")
class ConnectorTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.daemon = KvdndProcess(extra_args=["--share-host-tier"])  # mapped and fetched loads
        cls.gpu_daemon = KvdndProcess(extra_args=["--gpu-tier-bytes", str(64 << 20)])

    @classmethod
    def tearDownClass(cls):
        cls.daemon.stop()
        cls.gpu_daemon.stop()

    @contextlib.contextmanager
    def small_connector(self, ns):
        """A bf16 client of self.daemon in namespace ns and a connector with small staging."""
        with kvdn.Client(model("bfloat16"), target=self.daemon.unix_target,
                         namespace=ns) as client:
            conn = kvdn.KvConnector(client, host_staging_bytes=8 << 20,
                                    device_staging_bytes=4 << 20)
            try:
                yield client, conn
            finally:
                conn.close()

    def round_trip(self, daemon, layout, dtype, ns, use_gpu_tier, map_host_tier=True):
        n = CHUNK * 3 + 20  # a tail chunk of 20 tokens
        tokens = [random.Random(ns).randrange(128000) for _ in range(n)]
        with kvdn.Client(model(dtype), target=daemon.unix_target, namespace=ns) as client:
            conn = kvdn.KvConnector(client, use_gpu_tier=use_gpu_tier,
                                    map_host_tier=map_host_tier,
                                    host_staging_bytes=8 << 20, device_staging_bytes=4 << 20)
            try:
                a = Cache(layout, dtype, fill=True, seed=1, num_tokens=n)
                saved = conn.save(tokens, a.view())
                self.assertEqual((saved.chunks_stored, saved.chunks_present), (4, 0))
                self.assertEqual(client.lookup(tokens), n)

                # The stored bytes are the chunk format: [layer][K|V][token][head][dim].
                payloads = client.load_bytes(tokens)
                self.assertEqual(len(payloads), 4)
                for c, payload in enumerate(payloads):
                    lo, hi = c * CHUNK, min(n, (c + 1) * CHUNK)
                    parts = []
                    for layer in range(LAYERS):
                        k, v = a.gather(layer, n)
                        parts += [k[lo:hi], v[lo:hi]]
                    want = torch.cat([p.reshape(-1) for p in parts]).view(torch.uint8).cpu()
                    got = torch.frombuffer(payload, dtype=torch.uint8)
                    self.assertTrue(torch.equal(got, want), f"chunk {c}'s payload")

                # Loaded into another cache, through another block table, layer by layer on a
                # side stream: each layer is there once wait_layer has ordered the stream.
                b = Cache(layout, dtype, fill=False, seed=2, num_tokens=n)
                stream = torch.cuda.Stream()
                load = conn.start_load(tokens, b.view())
                sums = []
                for layer in range(LAYERS):
                    load.wait_layer(layer, stream)
                    with torch.cuda.stream(stream):
                        k, v = b.gather(layer, n)
                        sums.append((k.float().sum(), v.float().sum()))
                result = load.wait()
                stats = load.stats()
                load.close()
                stream.synchronize()
                self.assertEqual((result.tokens, result.chunks), (n, 4))
                self.assertEqual(stats.gpu_tier_chunks, 4 if use_gpu_tier else 0)
                # kvdnd shares its host tier (its default): mapped, the chunks there are copied
                # straight out of it; else fetched.
                self.assertEqual(stats.host_tier_chunks,
                                 4 if map_host_tier and not use_gpu_tier else 0)
                for layer in range(LAYERS):
                    ka, va = a.gather(layer, n)
                    kb, vb = b.gather(layer, n)
                    self.assertTrue(torch.equal(ka, kb), f"layer {layer} K")
                    self.assertTrue(torch.equal(va, vb), f"layer {layer} V")
                    self.assertEqual(sums[layer][0].item(), ka.float().sum().item())
                    self.assertEqual(sums[layer][1].item(), va.float().sum().item())
                self.assertTrue(b.untouched_blocks_are_zero(), "a block outside the table")
            finally:
                conn.close()

    def test_every_layout_round_trips_bit_for_bit(self):
        for layout in ("vllm", "nhd", "nhd_combined", "hnd"):
            for dtype in ("bfloat16", "float16"):
                with self.subTest(layout=layout, dtype=dtype):
                    # Both ways a load reads kvdnd's host tier: mapped (bf16) and fetched (fp16).
                    self.round_trip(self.daemon, layout, dtype, f"py-{layout}-{dtype}", False,
                                    map_host_tier=dtype == "bfloat16")

    def test_loads_from_the_gpu_tier_in_place(self):
        self.round_trip(self.gpu_daemon, "vllm", "bfloat16", "py-gpu-tier", True)

    def test_bad_views_get_precise_errors(self):
        n = CHUNK * 2
        tokens = list(range(n))
        with self.small_connector("py-bad") as (client, conn):
            a = Cache("vllm", "bfloat16", fill=True, seed=3, num_tokens=n)
            conn.save(tokens, a.view())
            cases = [
                ("a layer missing",
                 lambda: kvdn.PagedKvView.from_vllm(a.kv[:2], a.block_table), "has 2 layers"),
                ("block table too short",
                 lambda: kvdn.PagedKvView.from_vllm(a.kv, a.block_table[:3]), "block"),
                ("fp16 cache for a bf16 model",
                 lambda: kvdn.PagedKvView.from_vllm([t.half() for t in a.kv], a.block_table),
                 "dtype"),
            ]
            for name, make, text in cases:
                with self.subTest(name):
                    with self.assertRaises(kvdn.InvalidArgumentError) as e:
                        conn.start_load(tokens, make())
                    self.assertIn(text, e.exception.message)
                    with self.assertRaises(kvdn.InvalidArgumentError):
                        conn.save(tokens, make())
                    with self.assertRaises(kvdn.InvalidArgumentError):
                        conn.start_save(tokens, make())
            with self.assertRaises(ValueError):  # caught before the library
                kvdn.PagedKvView.from_vllm([t.cpu() for t in a.kv], a.block_table)
            with self.assertRaises(ValueError):
                kvdn.PagedKvView.from_vllm(a.kv, a.block_table.long())
            with self.assertRaises(ValueError):
                kvdn.PagedKvView.from_vllm([t[:, :, :8] for t in a.kv], a.block_table)
            # Still serving: the good view loads.
            b = Cache("vllm", "bfloat16", fill=False, seed=4, num_tokens=n)
            self.assertEqual(conn.load(tokens, b.view()).tokens, n)
            self.assertTrue(self.daemon.running())

    def test_a_started_save_ends_on_its_own_and_its_cache_may_change_at_once(self):
        n = CHUNK * 5 + 3
        tokens = list(range(3000, 3000 + n))
        with self.small_connector("py-start-save") as (client, conn):
            a = Cache("vllm", "bfloat16", fill=True, seed=7, num_tokens=n)
            want = [a.gather(layer, n) for layer in range(LAYERS)]
            save = conn.start_save(tokens, a.view())
            for t in a.kv:  # the engine's next step, on the same (current) stream
                t.fill_(5.0)
            result = save.wait()
            self.assertTrue(save.done())
            self.assertEqual((result.chunks_stored, result.chunks_present), (6, 0))
            save.close()
            with self.assertRaises(ValueError):
                save.wait()
            b = Cache("vllm", "bfloat16", fill=False, seed=8, num_tokens=n)
            self.assertEqual(conn.load(tokens, b.view()).tokens, n)
            for layer in range(LAYERS):
                kb, vb = b.gather(layer, n)
                self.assertTrue(torch.equal(kb, want[layer][0]), f"layer {layer} K")
                self.assertTrue(torch.equal(vb, want[layer][1]), f"layer {layer} V")

    def test_closing_the_client_first_closes_its_connector_and_loads(self):
        n = CHUNK * 2
        tokens = list(range(1000, 1000 + n))
        client = kvdn.Client(model("bfloat16"), target=self.daemon.unix_target, namespace="py-close")
        conn = kvdn.KvConnector(client, host_staging_bytes=8 << 20, device_staging_bytes=4 << 20)
        a = Cache("vllm", "bfloat16", fill=True, seed=5, num_tokens=n)
        conn.save(tokens, a.view())
        b = Cache("vllm", "bfloat16", fill=False, seed=6, num_tokens=n)
        load = conn.start_load(tokens, b.view())
        more = list(range(2000, 2000 + n))
        save = conn.start_save(more, a.view())
        client.close()  # the load, the save and the connector go first (no use after free)
        with self.assertRaises(ValueError):
            save.done()
        self.assertEqual(
            kvdn.Client(model("bfloat16"), target=self.daemon.unix_target,
                        namespace="py-close").lookup(more), n)  # the save ended, whole
        with self.assertRaises(ValueError):
            load.wait()
        with self.assertRaises(ValueError):
            conn.start_load(tokens, b.view())
        conn.close()


if __name__ == "__main__":
    unittest.main()
