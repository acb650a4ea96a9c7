"""A real kvdnd for the Python tests (as tests/integration/daemon_process.h): its own temp data
dir and unix socket, TCP and HTTP on port 0 (read from --ready-file), stopped with SIGTERM."""

import json
import os
import random
import signal
import subprocess
import tempfile
import time
import unittest


class KvdndProcess:
    def __init__(self, extra_args=(), config=None, host_tier="256MiB", disk_tier="512MiB"):
        self.dir = tempfile.mkdtemp(prefix="kvdn-py-")
        binary = os.environ.get("KVDN_KVDND")
        if not binary:
            raise RuntimeError("set KVDN_KVDND to the kvdnd binary")
        ready = os.path.join(self.dir, "ready.json")
        self.socket = os.path.join(self.dir, "kvdnd.sock")
        args = [binary, "--data-dir", os.path.join(self.dir, "data"), "--unix-socket",
                self.socket, "--grpc-address", "127.0.0.1:0", "--http-address", "127.0.0.1:0",
                "--host-tier-bytes", host_tier, "--disk-tier-bytes", disk_tier, "--ready-file",
                ready, "--log-level", "warn"]
        if config is not None:
            path = os.path.join(self.dir, "config.json")
            with open(path, "w") as f:
                json.dump(config, f)
            args += ["--config", path]
        args += list(extra_args)
        self.log_path = os.path.join(self.dir, "kvdnd.log")
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"kvdnd exited ({self.proc.returncode}): {self.log()}")
            if os.path.exists(ready):
                try:
                    with open(ready) as f:
                        info = json.load(f)
                    self.grpc_port = info["grpc_port"]
                    return
                except (ValueError, KeyError):
                    pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"kvdnd not ready in 20 s: {self.log()}")

    @property
    def unix_target(self):
        return "unix:" + self.socket

    @property
    def tcp_target(self):
        return f"127.0.0.1:{self.grpc_port}"

    def log(self):
        with open(self.log_path) as f:
            return f.read()[-4000:]

    def running(self):
        return self.proc.poll() is None

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        subprocess.run(["rm", "-rf", self.dir], check=False)


class DaemonTestCase(unittest.TestCase):
    """A test class whose tests share one kvdnd (self.daemon), started with `daemon_args`."""

    daemon_args = ()

    @classmethod
    def setUpClass(cls):
        cls.daemon = KvdndProcess(extra_args=cls.daemon_args)

    @classmethod
    def tearDownClass(cls):
        cls.daemon.stop()


def random_tokens(n, seed):
    """`n` token ids derived from `seed` (a Llama-3-sized vocabulary)."""
    rng = random.Random(seed)
    return [rng.randrange(0, 128000) for _ in range(n)]
