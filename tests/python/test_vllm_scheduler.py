"""kvdn's vLLM connector, scheduler side (python/kvdn/vllm_core.py SchedulerCore) against a real
kvdnd: how many tokens a request gets from kvdn past vLLM's own prefix cache, and each step's
loads and saves (label `python`; needs no GPU and no vLLM)."""

import unittest

import kvdn
from kvdn.vllm_core import LoadSpec, SaveSpec, SchedulerCore, order_layers
from kvdnd_process import DaemonTestCase, random_tokens as tokens

CHUNK, BLOCK = 64, 16
MODEL = kvdn.ModelSpec("py-vllm-sched", 2, 2, 64, "bfloat16", tokens_per_chunk=CHUNK)



class SchedulerTest(DaemonTestCase):
    def setUp(self):
        self.ns = f"sched-{self.id().rsplit('.', 1)[-1]}"[:60]
        self.client = kvdn.Client(MODEL, target=self.daemon.unix_target, namespace=self.ns)
        self.core = SchedulerCore(self.client, BLOCK)

    def tearDown(self):
        self.client.close()

    def store(self, prompt, chunks):
        """Another engine saved the first `chunks` chunks of prompt."""
        sizes = self.client.chunk_payload_sizes(len(prompt))[:chunks]
        self.client.save(prompt, [bytes(s) for s in sizes])

    def test_a_new_prompt_matches_nothing_and_is_saved_in_whole_chunks_after_prefill(self):
        p = tokens(CHUNK * 3 + 10, seed=1)
        self.assertEqual(self.core.num_new_matched_tokens("r1", p, 0), 0)
        self.core.after_alloc("r1", 0)
        blocks = list(range(100, 100 + 13))
        plan = self.core.plan([("r1", p, blocks, 0)], [], {"r1": len(p)}, set())
        self.assertEqual(plan.loads, [])
        self.assertEqual(plan.saves, [SaveSpec("r1", p[:CHUNK * 3], blocks[:12])])
        # Saved once: the decode steps after it save nothing.
        plan = self.core.plan([], [("r1", [113], False, len(p))], {"r1": 1}, set())
        self.assertEqual(plan.saves, [])

    def test_chunked_prefill_saves_when_the_prompt_is_done_with_all_its_blocks(self):
        p = tokens(CHUNK * 2, seed=2)
        self.core.num_new_matched_tokens("r", p, 0)
        self.core.after_alloc("r", 0)
        plan = self.core.plan([("r", p, [1, 2, 3, 4, 5], 0)], [], {"r": 80}, set())
        self.assertEqual(plan.saves, [])
        plan = self.core.plan([], [("r", [6, 7, 8], False, 80)], {"r": 48}, set())
        self.assertEqual(plan.saves, [SaveSpec("r", p, [1, 2, 3, 4, 5, 6, 7, 8])])

    def test_a_stored_prefix_is_loaded_past_the_local_prefix_cache(self):
        p = tokens(CHUNK * 3 + 5, seed=3)
        self.store(p, 2)
        # No local hit: both stored chunks.
        self.assertEqual(self.core.num_new_matched_tokens("a", p, 0), CHUNK * 2)
        # vLLM's own cache has the first chunk: the second only; its blocks are not written.
        self.assertEqual(self.core.num_new_matched_tokens("b", p, CHUNK), CHUNK)
        self.assertEqual(self.core.num_new_matched_tokens("c", p, CHUNK * 2), 0)
        blocks = list(range(40, 53))
        self.core.after_alloc("a", CHUNK * 2)
        self.core.after_alloc("b", CHUNK)
        self.core.after_alloc("c", 0)
        plan = self.core.plan([("a", p, blocks, 0), ("b", p, blocks, CHUNK),
                               ("c", p, blocks, CHUNK * 2)], [], {}, set())
        self.assertEqual(plan.loads, [
            LoadSpec("a", p[:CHUNK * 2], blocks[:8], 0),
            LoadSpec("b", p[:CHUNK * 2], blocks[:8], CHUNK // BLOCK),
        ])
        # Planned once.
        self.assertEqual(self.core.plan([], [], {}, set()).loads, [])

    def test_a_prompt_stored_whole_leaves_its_last_token_to_vllm(self):
        p = tokens(CHUNK * 2, seed=4)
        self.store(p, 2)
        self.assertEqual(self.client.lookup(p), CHUNK * 2)
        self.assertEqual(self.core.num_new_matched_tokens("r", p, 0), CHUNK)
        shorter = p[:CHUNK + 1]  # one token past the first chunk
        self.assertEqual(self.core.num_new_matched_tokens("s", shorter, 0), CHUNK)
        self.assertEqual(self.core.num_new_matched_tokens("t", p[:CHUNK], 0), 0)

    def test_another_prompt_or_namespace_matches_only_its_shared_chunks(self):
        p = tokens(CHUNK * 3, seed=5)
        self.store(p, 3)
        q = p[:CHUNK] + tokens(CHUNK * 2, seed=6)
        self.assertEqual(self.core.num_new_matched_tokens("q", q, 0), CHUNK)
        with kvdn.Client(MODEL, target=self.daemon.unix_target, namespace=self.ns + "-x") as o:
            self.assertEqual(SchedulerCore(o, BLOCK).num_new_matched_tokens("p", p, 0), 0)

    def test_resumed_requests_take_their_new_blocks_and_finished_ones_are_forgotten(self):
        p = tokens(CHUNK * 2, seed=7)
        self.core.num_new_matched_tokens("r", p, 0)
        self.core.after_alloc("r", 0)
        self.core.plan([("r", p, [1, 2, 3], 0)], [], {"r": 48}, set())
        # Preempted and resumed with other blocks: they replace the old ones.
        plan = self.core.plan([], [("r", [9, 8, 7, 6, 5, 4, 3, 2], True, 48)], {"r": 80}, set())
        self.assertEqual(plan.saves, [SaveSpec("r", p, [9, 8, 7, 6, 5, 4, 3, 2])])
        plan = self.core.plan([], [("r", [10], False, 128)], {"r": 1}, {"r"})
        self.assertEqual((plan.loads, plan.saves), ([], []))

    def test_switches_and_bad_configuration(self):
        p = tokens(CHUNK * 2 + 1, seed=8)
        self.store(p, 2)
        off = SchedulerCore(self.client, BLOCK, load=False, save=False)
        self.assertEqual(off.num_new_matched_tokens("r", p, 0), 0)
        off.after_alloc("r", 0)
        self.assertEqual(off.plan([("r", p, [1] * 9, 0)], [], {"r": len(p)}, set()).saves, [])
        with self.assertRaises(ValueError) as e:
            SchedulerCore(self.client, 48)  # 64-token chunks are not whole 48-token blocks
        self.assertIn("not a multiple", str(e.exception))

    def test_an_unreachable_kvdnd_is_an_error_the_connector_can_catch(self):
        with kvdn.Client(MODEL, target="unix:/nonexistent/kvdnd.sock", deadline=1.0,
                         max_attempts=1) as c:
            with self.assertRaises(kvdn.UnavailableError):
                SchedulerCore(c, BLOCK).num_new_matched_tokens("r", tokens(200, 9), 0)


class OrderLayersTest(unittest.TestCase):
    def test_layers_in_model_order(self):
        names = {"model.layers.10.self_attn.attn": 0, "model.layers.2.self_attn.attn": 0,
                 "model.layers.0.self_attn.attn": 0, "model.layers.1.self_attn.attn": 0}
        self.assertEqual(order_layers(names), ["model.layers.0.self_attn.attn",
                                               "model.layers.1.self_attn.attn",
                                               "model.layers.2.self_attn.attn",
                                               "model.layers.10.self_attn.attn"])


if __name__ == "__main__":
    unittest.main()
