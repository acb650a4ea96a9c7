"""kvdn's Python package (python/kvdn, over libkvdn_c.so) against a real kvdnd: round trips over
both data planes, prefixes, tenants and tokens, and every kind of bad input gets its exact error.
Run by ctest (label `python`) with KVDN_C_LIBRARY, KVDN_KVDND and PYTHONPATH set."""

import array
import os
import random
import unittest

import kvdn
from kvdnd_process import DaemonTestCase, KvdndProcess, random_tokens

# Small chunks keep the test quick: 2 layers x 16 tokens x 2 heads x 64 dims x bf16 x K,V = 16 KiB.
MODEL = kvdn.ModelSpec("py-test", num_layers=2, num_kv_heads=2, head_dim=64, dtype="bfloat16",
                       tokens_per_chunk=16)
CHUNK_BYTES = 2 * 2 * 16 * 2 * 64 * 2



def payloads_for(client, tokens, seed):
    rng = random.Random(seed)
    return [rng.randbytes(s) for s in client.chunk_payload_sizes(len(tokens))]


class ClientTest(DaemonTestCase):
    def client(self, **kw):
        kw.setdefault("target", self.daemon.unix_target)
        return kvdn.Client(kw.pop("model", MODEL), **kw)

    def test_sizes_follow_the_model(self):
        with self.client() as c:
            self.assertEqual(c.chunk_payload_sizes(40), [CHUNK_BYTES, CHUNK_BYTES,
                                                         CHUNK_BYTES // 2])
            self.assertEqual(c.chunk_payload_sizes(0), [])

    def test_round_trip_is_bit_exact_over_each_data_plane(self):
        for i, plane in enumerate(["grpc", "auto"]):
            with self.subTest(plane=plane), self.client(data_plane=plane) as c:
                tokens = random_tokens(16 * 5 + 7, seed=100 + i)  # a short tail chunk
                payloads = payloads_for(c, tokens, seed=200 + i)
                self.assertEqual(c.lookup(tokens), 0)
                r = c.save(tokens, payloads)
                self.assertEqual((r.chunks_stored, r.chunks_present), (6, 0))
                # Each chunk travels encoded: its 64-byte header, then the payload.
                self.assertEqual(r.bytes_sent, sum(len(p) + 64 for p in payloads))
                self.assertEqual(c.lookup(tokens), len(tokens))
                self.assertEqual(c.load_bytes(tokens), [bytearray(p) for p in payloads])
                # Saving again stores nothing new.
                self.assertEqual(c.save(tokens, payloads).chunks_present, 6)
                if plane == "auto":
                    self.assertTrue(c.data_plane.startswith("ucx"), c.data_plane)
                else:
                    self.assertEqual(c.data_plane, "grpc")

    def test_the_other_plane_reads_the_same_bytes(self):
        tokens = random_tokens(64, seed=7)
        with self.client(data_plane="auto") as a, self.client(data_plane="grpc",
                                                              target=self.daemon.tcp_target) as b:
            payloads = payloads_for(a, tokens, seed=8)
            a.save(tokens, payloads)
            self.assertEqual(b.load_bytes(tokens), [bytearray(p) for p in payloads])

    def test_lookup_finds_the_longest_stored_prefix(self):
        with self.client() as c:
            tokens = random_tokens(16 * 4, seed=11)
            payloads = payloads_for(c, tokens, seed=12)
            c.save(tokens[:32], payloads[:2])
            self.assertEqual(c.lookup(tokens), 32)
            other = tokens[:16] + [t + 1 for t in tokens[16:]]  # shares the first chunk only
            self.assertEqual(c.lookup(other), 16)
            loaded = c.load_bytes(tokens)
            self.assertEqual(loaded, [bytearray(p) for p in payloads[:2]])
            # first_chunk: the rest saved later, loaded from chunk 2 on.
            c.save(tokens, payloads[2:], first_chunk=2)
            self.assertEqual(c.load_bytes(tokens, first_chunk=2),
                             [bytearray(p) for p in payloads[2:]])

    def test_tokens_and_buffers_of_many_kinds(self):
        with self.client() as c:
            tokens = random_tokens(32, seed=21)
            payloads = payloads_for(c, tokens, seed=22)
            c.save(array.array("i", tokens), [memoryview(p) for p in payloads])
            self.assertEqual(c.lookup(tuple(tokens)), 32)
            self.assertEqual(c.lookup(memoryview(array.array("i", tokens))), 32)
            buffers = [bytearray(CHUNK_BYTES), memoryview(bytearray(CHUNK_BYTES))]
            r = c.load_into(tokens, buffers)
            self.assertEqual((r.tokens, r.chunks, r.bytes), (32, 2, 2 * CHUNK_BYTES))
            self.assertEqual(bytes(buffers[0]), payloads[0])
            self.assertEqual(bytes(buffers[1]), payloads[1])

    def test_namespaces_never_share(self):
        tokens = random_tokens(32, seed=31)
        with self.client(namespace="tenant-a") as a, self.client(namespace="tenant-b") as b:
            a.save(tokens, payloads_for(a, tokens, seed=32))
            self.assertEqual(a.lookup(tokens), 32)
            self.assertEqual(b.lookup(tokens), 0)
            self.assertEqual(b.load_bytes(tokens), [])

    def test_bad_input_gets_a_precise_error_and_nothing_is_stored(self):
        with self.client() as c:
            tokens = random_tokens(32, seed=41)
            good = payloads_for(c, tokens, seed=42)
            cases = [
                ("a payload of the wrong size",
                 lambda: c.save(tokens, [good[0], good[1][:-1]]), kvdn.InvalidArgumentError,
                 f"payload 1 (chunk 1) has {CHUNK_BYTES - 1} bytes"),
                ("more payloads than chunks", lambda: c.save(tokens, good + [good[0]]),
                 kvdn.InvalidArgumentError, "chunk"),
                ("a load buffer of the wrong size",
                 lambda: c.load_into(tokens, [bytearray(CHUNK_BYTES + 1)]),
                 kvdn.InvalidArgumentError, f"buffer 0 (chunk 0) has {CHUNK_BYTES + 1} bytes"),
                ("first_chunk past the chunks", lambda: c.load_bytes(tokens, first_chunk=5),
                 kvdn.InvalidArgumentError, "first_chunk"),
            ]
            for name, call, error, text in cases:
                with self.subTest(name):
                    with self.assertRaises(error) as e:
                        call()
                    self.assertIn(text, e.exception.message)
                    self.assertEqual(e.exception.code_name, "INVALID_ARGUMENT")
            self.assertEqual(c.lookup(tokens), 0)  # nothing of the failed saves landed
            with self.assertRaises(TypeError):
                c.lookup(["not", "tokens"])
            with self.assertRaises(TypeError):
                c.load_into(tokens, [bytes(CHUNK_BYTES)])  # read-only
            self.assertTrue(self.daemon.running())
            # The daemon still serves.
            c.save(tokens, good)
            self.assertEqual(c.load_bytes(tokens), [bytearray(p) for p in good])

    def test_bad_options_name_the_field(self):
        cases = [
            ("num_layers", dict(model=kvdn.ModelSpec("m", 0, 2, 64)), "num_layers"),
            ("head_dim", dict(model=kvdn.ModelSpec("m", 2, 2, 0)), "head_dim"),
            ("dtype code", dict(model=kvdn.ModelSpec("m", 2, 2, 64, dtype=77)), "dtype"),
            ("deadline", dict(deadline=0), "deadline"),
            ("namespace", dict(namespace="bad ns/"), "namespace"),
        ]
        for name, kw, text in cases:
            with self.subTest(name):
                with self.assertRaises(kvdn.InvalidArgumentError) as e:
                    self.client(**kw)
                self.assertIn(text, e.exception.message)
        with self.assertRaises(ValueError):
            self.client(data_plane="carrier-pigeon")
        with self.assertRaises(ValueError):
            self.client(model=kvdn.ModelSpec("m", 2, 2, 64, dtype="int4"))

    def test_an_absent_daemon_is_unavailable(self):
        with kvdn.Client(MODEL, target="unix:" + os.path.join(self.daemon.dir, "nobody.sock"),
                         deadline=1.0, max_attempts=2) as c:
            with self.assertRaises(kvdn.UnavailableError):
                c.lookup(random_tokens(16, seed=51))

    def test_a_closed_client_refuses_calls(self):
        c = self.client()
        c.close()
        c.close()  # twice is fine
        with self.assertRaises(ValueError):
            c.lookup([1, 2, 3])


class TokensTest(unittest.TestCase):
    """A kvdnd with auth_tokens_file: the token reaches only its namespaces."""

    TOKEN_A = "py-tenant-a-token-0123456789"

    @classmethod
    def setUpClass(cls):
        import tempfile

        cls.tokens_dir = tempfile.mkdtemp(prefix="kvdn-py-tokens-")
        path = os.path.join(cls.tokens_dir, "tokens")
        with open(path, "w") as f:
            f.write(f"{cls.TOKEN_A} tenant-a\n")
        cls.daemon = KvdndProcess(config={"auth_tokens_file": path})

    @classmethod
    def tearDownClass(cls):
        cls.daemon.stop()

    def test_tokens_gate_namespaces(self):
        tokens = random_tokens(32, seed=61)
        target = self.daemon.unix_target
        with kvdn.Client(MODEL, target=target, namespace="tenant-a", token=self.TOKEN_A) as a:
            a.save(tokens, payloads_for(a, tokens, seed=62))
            self.assertEqual(a.lookup(tokens), 32)
        with kvdn.Client(MODEL, target=target, namespace="tenant-b", token=self.TOKEN_A) as b:
            with self.assertRaises(kvdn.PermissionDeniedError) as e:
                b.lookup(tokens)
            self.assertIn("tenant-b", e.exception.message)
        with kvdn.Client(MODEL, target=target, namespace="tenant-a", token="not-a-token-at-all") \
                as x:
            with self.assertRaises(kvdn.UnauthenticatedError):
                x.lookup(tokens)
        saved = os.environ.pop("KVDN_TOKEN", None), os.environ.pop("KVDN_TOKEN_FILE", None)
        try:
            with kvdn.Client(MODEL, target=target, namespace="tenant-a") as none:
                with self.assertRaises(kvdn.UnauthenticatedError):
                    none.lookup(tokens)
            os.environ["KVDN_TOKEN"] = self.TOKEN_A  # the environment's token
            with kvdn.Client(MODEL, target=target, namespace="tenant-a") as env:
                self.assertEqual(env.lookup(tokens), 32)
        finally:
            os.environ.pop("KVDN_TOKEN", None)
            if saved[0] is not None:
                os.environ["KVDN_TOKEN"] = saved[0]
            if saved[1] is not None:
                os.environ["KVDN_TOKEN_FILE"] = saved[1]


class TlsTest(unittest.TestCase):
    """A kvdnd with TLS on its TCP listener (config tls): the package's tls_* options."""

    @classmethod
    def setUpClass(cls):
        import subprocess
        import tempfile

        cls.certs = tempfile.mkdtemp(prefix="kvdn-py-tls-")
        d = cls.certs
        with open(os.path.join(d, "server.ext"), "w") as f:
            f.write("subjectAltName=DNS:kvdnd.test,IP:127.0.0.1\n")
        key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
        for cmd in (
            ["req", "-x509", *key, "-keyout", f"{d}/ca.key", "-out", f"{d}/ca.pem", "-days", "2",
             "-subj", "/CN=kvdn-py-ca"],
            ["req", *key, "-keyout", f"{d}/server.key", "-out", f"{d}/server.csr", "-subj",
             "/CN=kvdnd.test"],
            ["x509", "-req", "-in", f"{d}/server.csr", "-CA", f"{d}/ca.pem", "-CAkey",
             f"{d}/ca.key", "-CAcreateserial", "-out", f"{d}/server.pem", "-days", "2",
             "-extfile", f"{d}/server.ext"],
        ):
            subprocess.run(["openssl", *cmd], check=True, capture_output=True)
        cls.daemon = KvdndProcess(config={"tls": {"cert_file": f"{d}/server.pem",
                                                  "key_file": f"{d}/server.key"}})

    @classmethod
    def tearDownClass(cls):
        import shutil

        cls.daemon.stop()
        shutil.rmtree(cls.certs, ignore_errors=True)

    def test_a_client_trusting_the_ca_round_trips_over_tcp(self):
        tokens = random_tokens(48, seed=71)
        with kvdn.Client(MODEL, target=self.daemon.tcp_target, namespace="py-tls",
                         tls_ca_file=f"{self.certs}/ca.pem", tls_server_name="kvdnd.test") as c:
            payloads = payloads_for(c, tokens, seed=72)
            self.assertEqual(c.save(tokens, payloads).chunks_stored, 3)
            self.assertEqual(c.load_bytes(tokens), [bytearray(p) for p in payloads])
            self.assertEqual(c.data_plane, "grpc")  # UCX stays on the host with TLS

    def test_clients_that_cannot_use_it_get_clear_errors(self):
        tokens = random_tokens(16, seed=73)
        with kvdn.Client(MODEL, target=self.daemon.tcp_target, deadline=2.0,
                         max_attempts=1) as plain:
            with self.assertRaises(kvdn.UnavailableError):
                plain.lookup(tokens)
        missing = f"{self.certs}/missing.pem"
        with self.assertRaises(kvdn.NotFoundError) as e:
            kvdn.Client(MODEL, target=self.daemon.tcp_target, tls_ca_file=missing)
        self.assertIn(f"ClientOptions.tls.ca_file: \"{missing}\" cannot be read",
                      e.exception.message)
        with self.assertRaises(kvdn.InvalidArgumentError) as e:
            kvdn.Client(MODEL, target=self.daemon.tcp_target, tls_server_name="kvdnd.test")
        self.assertIn("ClientOptions.tls.ca_file is empty", e.exception.message)


class LibraryTest(unittest.TestCase):
    def test_the_library_speaks_this_packages_abi(self):
        from kvdn import _native

        self.assertEqual(_native.lib().kvdn_abi_version(), _native.ABI_VERSION)

    def test_null_handles_get_a_precise_error_at_the_c_boundary(self):
        # The C interface's save calls with null handles: INVALID_ARGUMENT naming them (a library
        # built without CUDA answers FAILED_PRECONDITION saying so); the frees accept null.
        import ctypes

        from kvdn import _native

        lib = _native.lib()
        flag, out = ctypes.c_int32(), _native.SaveResultC()
        for call, args, names in [
                (lib.kvdn_save_done, (None, ctypes.byref(flag)), "save and done"),
                (lib.kvdn_save_wait, (None, ctypes.byref(out)), "save and out"),
                (lib.kvdn_connector_start_save, (None, None, 0, None, None, None),
                 "connector and out")]:
            code = call(*args)
            message = lib.kvdn_last_error().decode()
            if code == 9:  # FAILED_PRECONDITION: no connector in this build
                self.assertIn("built without CUDA", message)
            else:
                self.assertEqual(code, 3, message)
                self.assertIn(f"{names} must not be null", message)
        lib.kvdn_save_free(None)

    def test_a_missing_library_is_a_clear_error(self):
        import subprocess
        import sys

        env = dict(os.environ, KVDN_C_LIBRARY="/nonexistent/libkvdn_c.so")
        r = subprocess.run([sys.executable, "-c", "import kvdn; kvdn.Client(kvdn.ModelSpec("
                            "'m', 1, 1, 64))"], env=env, capture_output=True, text=True)
        self.assertNotEqual(r.returncode, 0)
        self.assertIn("KVDN_C_LIBRARY", r.stderr)


if __name__ == "__main__":
    unittest.main()
