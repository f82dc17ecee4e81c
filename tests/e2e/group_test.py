"""Replica groups end to end: groups of 2 and 3 tscale-server processes on loopback (Gloo over
c10d), driven by tscale.ReplicaGroup and by each rank's own client.

- replicas byte-identical after 20 TrainSteps, and after 20 rounds of Forward / several Backward
  per rank / UpdateCorrelation;
- exactly the single server's state when trained on the concatenated batch, on data whose float32
  sums are exact in any order; on random data, the fraction of scores equal to the single
  server's (printed);
- a call only one rank receives, mismatched specs and steps, a rank killed with SIGKILL in the
  middle of a TrainStep: clean failures, nothing changed, every other server alive, and the group
  trains again;
- two ranks in separate network namespaces joined by a veth pair (skipped, saying why, where
  namespaces cannot be made).
"""

import os
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import unittest
import urllib.request
import uuid

import grpc
import numpy as np

import tscale
from server_process import ErrorAssertions, ServerProcess

TIMEOUT = 5  # --group-timeout-seconds of the test groups


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def linear_spec(n_in, n_out, bias=False):
    return {"layers": [{"name": "fc", "ternary_linear": {
        "in_features": n_in, "out_features": n_out, "bias": bias}}]}


MLP = {"layers": [
    {"name": "fc1", "ternary_linear": {"in_features": 16, "out_features": 32}},
    {"name": "act", "activation": {"kind": "RELU"}},
    {"name": "fc2", "ternary_linear": {"in_features": 32, "out_features": 8, "bias": True}},
]}


class Group:
    """N tscale-server processes forming one group on loopback (or under `prefixes`)."""

    def __init__(self, size, store_host="127.0.0.1", listen=None, prefixes=None, extra=(),
                 device=None):
        self.store = f"{store_host}:{free_port()}"
        self.servers = []
        for r in range(size):
            args = ["--group-size", str(size), "--group-rank", str(r), "--group-store", self.store,
                    "--group-timeout-seconds", str(TIMEOUT), *extra]
            if listen is not None:
                args += ["--listen", listen[r]]
            kwargs = {} if device is None else {"device": device}
            self.servers.append(ServerProcess(*args, prefix=prefixes[r] if prefixes else (),
                                              **kwargs))

    def start(self, announce_skip=True):
        """Starts the ranks; SkipTest (announced with "group_test: skipped:", which makes ctest
        count the entry as skipped, unless `announce_skip` is false) where this build's groups
        cannot run here."""
        for s in self.servers:
            try:
                s.start(ready=False)
            except RuntimeError as e:
                if "built without replica groups" in str(e):
                    # A LibTorch with neither Gloo's headers nor NCCL: no groups to test.
                    if announce_skip:
                        print("group_test: skipped: this tscale-server was built without "
                              "replica groups")
                    raise unittest.SkipTest("tscale-server built without replica groups")
                if "run over NCCL alone" in str(e):
                    # A LibTorch without Gloo's headers (PyTorch's wheels): groups of models on
                    # GPUs, one per rank; the groups of CPU models here cannot run.
                    if announce_skip:
                        print(f"group_test: skipped: this tscale-server's groups run over NCCL "
                              f"alone, for models on GPUs (a group of {len(self.servers)} on "
                              f"{self.servers[0].device or 'its default device'} cannot run)")
                    raise unittest.SkipTest("groups over NCCL alone need GPU models")
                raise
        for s in self.servers:
            s.wait_ready()
        self.client = tscale.ReplicaGroup([s.address for s in self.servers], retry_seconds=30,
                                          timeout=60)
        return self

    def stop(self):
        self.client.close()
        statuses = [s.stop() for s in self.servers]
        return statuses

    def __del__(self):
        for s in self.servers:
            s.remove_logs()

    def states(self, model_id):
        return self.client.export_states(model_id)


def tensors(state):
    """The tensors of a state file (the metadata names the model, which may differ)."""
    return {k: v.tobytes() for k, v in tscale.safetensors.loads(state)[0].items()}


def batch(seed, rows, n_in, n_out, lo=-3, hi=4):
    rng = np.random.RandomState(seed)
    x = rng.randint(lo, hi, size=(rows, n_in)).astype(np.float32)
    y = rng.randint(lo, hi, size=(rows, n_out)).astype(np.float32)
    return x, y


class GroupTest(ErrorAssertions, unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.single = ServerProcess().start()
        cls.single_client = cls.single.client()

    @classmethod
    def tearDownClass(cls):
        cls.single_client.close()
        cls.single.stop()
        cls.single.remove_logs()

    def fresh_single(self, model_id, spec, seed):
        model_id = f"{model_id}-{uuid.uuid4().hex[:8]}"
        self.single_client.create_model(model_id, spec, seed=seed)
        return model_id

    def test_group_of_one_on_each_device(self):
        """A group of one server process on the host (Gloo) and on the first GPU (NCCL, where
        built in): it forms, names its backend, and its TrainSteps, through the whole exchange,
        equal a single server's exactly (the same batch, the same sums)."""
        devices = [d for d in self.single_client.server_info().devices
                   if d == "cpu" or d.startswith("cuda")]
        devices = devices[:1] + [d for d in devices if d.startswith("cuda")][:1]
        for device in devices:
            with self.subTest(device=device):
                try:
                    g = Group(1, device=device).start(announce_skip=False)
                except unittest.SkipTest as e:
                    print(f"group_test: group of one on {device}: skipped ({e})")
                    continue
                try:
                    info = g.client.server_info()[0]
                    self.assertTrue(info.group_formed)
                    self.assertIn("nccl" if device.startswith("cuda") else "gloo",
                                  info.group_backend)
                    g.client.create_model("m", MLP, seed=3, device=device)
                    ref = f"one-{uuid.uuid4().hex[:8]}"
                    self.single_client.create_model(ref, MLP, seed=3, device=device)
                    for step in range(20):
                        x, y = batch(100 + step, 8, 16, 8)
                        r = g.client.train_step("m", x, y, expected_step=step)
                        s = self.single_client.train_step(ref, x, y, expected_step=step)
                        self.assertEqual(r.step, step + 1)
                        self.assertAlmostEqual(r.loss, s.loss, delta=1e-6 * abs(s.loss))
                        self.assertEqual(tensors(g.states("m")[0]),
                                         tensors(self.single_client.export_state(ref)),
                                         f"{device}: after step {step + 1}")
                    print(f"\ngroup_test: group of one on {device} ({info.group_backend}): 20 "
                          f"TrainSteps equal the single server's state after every step")
                    self.single_client.delete_model(ref)
                finally:
                    g.stop()

    def test_train_steps_of_groups_of_2_and_3(self):
        for size in (2, 3):
            with self.subTest(size=size):
                g = Group(size).start()
                try:
                    info = g.client.server_info()
                    self.assertEqual([(i.group_size, i.group_rank, i.group_formed) for i in info],
                                     [(size, r, True) for r in range(size)])
                    g.client.create_model("m", MLP, seed=7)
                    ref = self.fresh_single("m", MLP, seed=7)
                    self.assertEqual(len(set(g.states("m"))), 1, "replicas after create")
                    # 8 rows split 4+4 or 2+3+3 (the shares of the mean differ in size).
                    same = 0
                    in_step = True  # the group's state equals the single server's
                    for step in range(20):
                        x, y = batch(step, 8, 16, 8)
                        r = g.client.train_step("m", x, y, expected_step=step)
                        s = self.single_client.train_step(ref, x, y, expected_step=step)
                        self.assertEqual(r.step, step + 1)
                        if in_step:  # the same model: the same loss, up to summation order
                            self.assertAlmostEqual(r.loss, s.loss, delta=1e-5 * abs(s.loss))
                        states = g.states("m")
                        self.assertEqual(len(set(states)), 1, f"replicas differ after {step + 1}")
                        single = tensors(self.single_client.export_state(ref))
                        in_step = tensors(states[0]) == single
                        same += in_step
                        if step == 0:
                            # Before the first update every scale is a power of two: every sum
                            # of these small integers is exact, whatever its order.
                            self.assertEqual(tensors(states[0]), single)
                    print(f"\ngroup_test: group of {size}, 20 TrainSteps: the state equals the "
                          f"single server's after {same} of 20 steps")
                    # A retry of the last step is replayed on every rank.
                    x, y = batch(19, 8, 16, 8)
                    again = g.client.train_step("m", x, y, expected_step=19)
                    self.assertTrue(again.replayed)
                    self.assertEqual(again.step, 20)
                    self.assertAlmostEqual(again.loss, r.loss)
                finally:
                    g.stop()

    def test_forward_backward_update_rounds(self):
        size = 3
        g = Group(size).start()
        try:
            # A single linear layer with small-integer inputs and output gradients: its weight
            # gradients are integers, their sums exact in any order: the group's state must be
            # the single server's. The MLP: replicas identical.
            linear = linear_spec(24, 16)
            g.client.create_model("lin", linear, seed=3)
            g.client.create_model("mlp", MLP, seed=3)
            ref = self.fresh_single("lin", linear, seed=3)
            for step in range(20):
                # Several Backward calls per rank, each of a different pass; the single server
                # runs every pass of every rank.
                for r in range(size):
                    for k in range(2):
                        seed = 100 * step + 10 * r + k
                        x, gy = batch(seed, 2, 24, 16)
                        fr = g.client.forward("lin", x, train=True, rank=r)
                        g.client.backward("lin", fr.pass_id, gy, rank=r)
                        fs = self.single_client.forward(ref, x, train=True)
                        self.single_client.backward(ref, fs.pass_id, gy)
                        xm, gm = batch(seed, 2, 16, 8)
                        fm = g.client.forward("mlp", xm, train=True, rank=r)
                        g.client.backward("mlp", fm.pass_id, gm, rank=r)
                u = g.client.update_correlation("lin", step)
                self.single_client.update_correlation(ref, step)
                self.assertEqual(u.step, step + 1)
                self.assertEqual(g.client.update_correlation("mlp", step).step, step + 1)
                for model in ("lin", "mlp"):
                    states = g.states(model)
                    self.assertEqual(len(set(states)), 1, f"{model}: replicas differ after round "
                                                          f"{step + 1}")
                self.assertEqual(tensors(g.states("lin")[0]),
                                 tensors(self.single_client.export_state(ref)),
                                 f"the single server's state after round {step + 1}")
            # A rank with no Backward at a step brings zeros; no rank with one: refused.
            with self.assertError(grpc.StatusCode.FAILED_PRECONDITION, "no Backward on any rank"):
                g.client.update_correlation("lin", 20)
        finally:
            g.stop()

    def test_sign_agreement_on_random_data(self):
        size = 2
        g = Group(size).start()
        try:
            spec = linear_spec(256, 128, bias=True)
            g.client.create_model("m", spec, seed=11)
            ref = self.fresh_single("m", spec, seed=11)
            rng = np.random.RandomState(5)
            equal = total = 0
            for step in range(10):
                x = rng.randn(64, 256).astype(np.float32)
                y = rng.randn(64, 128).astype(np.float32)
                # From the same state: the group's update against the single server's.
                g.client.import_state("m", self.single_client.export_state(ref), replace=True)
                r = g.client.train_step("m", x, y, expected_step=step)
                self.single_client.train_step(ref, x, y, expected_step=step)
                mine = tscale.safetensors.loads(g.states("m")[0])[0]
                want = tscale.safetensors.loads(self.single_client.export_state(ref))[0]
                a, b = mine["fc.corr_accum"], want["fc.corr_accum"]
                equal += int((a == b).sum())
                total += a.size
                self.assertEqual(r.step, step + 1)
            fraction = equal / total
            print(f"\ngroup_test: random data, groups of 2: {fraction:.6f} of the per-group scores "
                  f"({total} over 10 steps) equal to the single server's")
            self.assertGreater(fraction, 0.99)
        finally:
            g.stop()

    def test_mismatched_calls_fail_everywhere_and_change_nothing(self):
        g = Group(2).start()
        try:
            c0, c1 = g.client.clients
            spec = linear_spec(8, 4)
            # Different seeds: refused on both ranks, no model anywhere.
            results = [None, None]

            def create(r, client, seed):
                try:
                    client.create_model("m", spec, seed=seed)
                except tscale.Error as e:
                    results[r] = e
            ts = [threading.Thread(target=create, args=(r, c, 1 + r))
                  for r, c in enumerate((c0, c1))]
            for t in ts:
                t.start()
            for t in ts:
                t.join()
            for e in results:
                self.assertIsNotNone(e)
                self.assertEqual(e.code, grpc.StatusCode.FAILED_PRECONDITION, e.message)
                self.assertIn("spec, seed, device or compute", e.message)
            self.assertEqual([len(c.list_models()) for c in (c0, c1)], [0, 0])

            g.client.create_model("m", spec, seed=1)
            before = g.states("m")
            # Different expected steps.
            x, y = batch(0, 2, 8, 4)
            errors = [None, None]

            def step(r, client, expected):
                try:
                    client.train_step("m", x[r:r + 1], y[r:r + 1], expected_step=expected)
                except tscale.Error as e:
                    errors[r] = e
            ts = [threading.Thread(target=step, args=(r, c, r)) for r, c in enumerate((c0, c1))]
            for t in ts:
                t.start()
            for t in ts:
                t.join()
            for e in errors:
                self.assertIsNotNone(e)
                self.assertEqual(e.code, grpc.StatusCode.FAILED_PRECONDITION, e.message)
                self.assertIn("expected_step: rank 0 received 0, rank 1 received 1", e.message)
            self.assertEqual(g.states("m"), before)

            # A call only rank 0 receives: UNAVAILABLE within the timeout, nothing applied.
            start = time.monotonic()
            with self.assertError(grpc.StatusCode.UNAVAILABLE, "did not join"):
                tscale.Client(g.servers[0].address, retries=0).train_step(
                    "m", x, y, expected_step=0)
            self.assertLess(time.monotonic() - start, TIMEOUT + 10)
            self.assertEqual(g.states("m"), before)
            # The group re-forms and trains again, without a restart.
            r = g.client.train_step("m", x, y, expected_step=0)
            self.assertEqual(r.step, 1)
            self.assertEqual(len(set(g.states("m"))), 1)
            info = g.client.server_info()
            self.assertTrue(all(i.group_formed for i in info))
            self.assertGreater(info[0].group_generation, 0)
        finally:
            g.stop()

    def test_rank_killed_in_the_middle_of_a_train_step(self):
        g = Group(2).start()
        try:
            # Large enough that a step takes a while on this machine.
            spec = linear_spec(1024, 1024)
            g.client.create_model("m", spec, seed=2)
            x = np.random.RandomState(0).randn(512, 1024).astype(np.float32)
            y = np.random.RandomState(1).randn(512, 1024).astype(np.float32)
            g.client.train_step("m", x, y, expected_step=0)
            before = g.states("m")[0]
            c0 = tscale.Client(g.servers[0].address, retries=0, timeout=60)
            outcome = {}

            def step():
                try:
                    outcome["result"] = c0.train_step("m", x[:256], y[:256], expected_step=1)
                except tscale.Error as e:
                    outcome["error"] = e
            t = threading.Thread(target=step)
            t.start()
            c1 = tscale.Client(g.servers[1].address, retries=0, timeout=60)
            t1 = threading.Thread(target=lambda: self._quietly(
                lambda: c1.train_step("m", x[256:], y[256:], expected_step=1)))
            t1.start()
            time.sleep(0.05)
            g.servers[1].sigkill()
            start = time.monotonic()
            t.join(TIMEOUT + 30)
            t1.join(5)
            self.assertFalse(t.is_alive(), "rank 0 did not answer within the group timeout")
            self.assertLess(time.monotonic() - start, TIMEOUT + 30)
            self.assertTrue(g.servers[0].running(), "rank 0 died")
            if "error" in outcome:
                e = outcome["error"]
                print(f"\ngroup_test: rank 1 killed mid-step; rank 0 answered {e.code.name}: "
                      f"{e.message}")
                self.assertIn(e.code, (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED))
                self.assertEqual(c0.export_state("m"), before, "rank 0 changed")
            else:
                # Rank 1 had sent its every part before it died: rank 0 committed.
                print("\ngroup_test: rank 1 killed after its part; rank 0 committed step 2")
                self.assertEqual(outcome["result"].step, 2)
            # Rank 0 still serves reads and inference.
            c0.forward("m", x[:2])
            # The rank comes back empty: the group re-forms, brings it forward from rank 0, and
            # trains on with identical replicas.
            g.servers[1].start(ready=False)
            g.client.close()
            g.client = tscale.ReplicaGroup([s.address for s in g.servers], retry_seconds=30)
            g.client.wait_ready(timeout=60)
            step = g.client.step("m")
            states = g.states("m")
            self.assertEqual(states[0], states[1])
            self.assertIn("brought forward from rank 0", g.servers[1].log())
            self.assertEqual(g.client.train_step("m", x[:4], y[:4], expected_step=step).step,
                             step + 1)
            states = g.states("m")
            self.assertEqual(states[0], states[1])
            c0.close()
            c1.close()
        finally:
            g.stop()

    def test_a_member_brought_forward_replays_the_last_update(self):
        """A client whose answer to a TrainStep was lost retries it after a member died and came
        back empty: the member, brought forward from rank 0 with the record of that update,
        replays it like the others (the same loss, no second update); another batch at that
        stale step is refused on every rank, the member too (its part's fingerprint came
        along)."""
        g = Group(2).start()
        try:
            g.client.create_model("m", MLP, seed=5)
            for step in range(3):
                x, y = batch(50 + step, 6, 16, 8)
                last = g.client.train_step("m", x, y, expected_step=step)
            g.servers[1].sigkill()
            g.servers[1].start(ready=False)
            g.client.close()
            g.client = tscale.ReplicaGroup([s.address for s in g.servers], retry_seconds=60)
            g.client.wait_ready(timeout=60)
            self.assertIn("brought forward from rank 0", g.servers[1].log())
            before = g.states("m")
            self.assertEqual(before[0], before[1])
            r = g.client.train_step("m", x, y, expected_step=2)
            self.assertTrue(r.replayed, "the retry was not replayed on every rank")
            self.assertEqual((r.step, r.loss), (3, last.loss))
            self.assertEqual(g.states("m"), before)
            other_x, other_y = batch(99, 6, 16, 8)
            for rank, server in enumerate(g.servers):
                with tscale.Client(server.address, retries=0) as c:
                    with self.assertRaises(tscale.Error) as cm:
                        part = slice(3 * rank, 3 * rank + 3)
                        c.train_step("m", other_x[part], other_y[part], expected_step=2)
                    self.assertEqual(cm.exception.code, grpc.StatusCode.FAILED_PRECONDITION,
                                     f"rank {rank}: {cm.exception}")
            self.assertEqual(g.states("m"), before)
        finally:
            g.stop()

    def test_a_member_killed_and_restarted_empty_five_times(self):
        """Each cycle: rank 2 of 3 is killed with SIGKILL while the group trains, comes back
        empty, is brought forward from a live peer, and the group goes on. The client then
        retries the step the kill interrupted: where the survivors had committed it, every rank
        replays it (the member brought forward too, from its peer's record), else it applies
        once. The model's step is the number of updates the client was told were applied, and
        the replicas identical."""
        g = Group(3).start()
        try:
            g.client.create_model("m", MLP, seed=8)
            applied = 0
            replays = 0
            rejoin_seconds = []
            for cycle in range(5):
                x, y = batch(cycle, 6, 16, 8)
                killer = threading.Timer(0.05, g.servers[2].sigkill)
                killer.start()
                for _ in range(20):  # train until the kill shows
                    try:
                        with tscale.ReplicaGroup([s.address for s in g.servers],
                                                 retry_seconds=0) as once:
                            r = once.train_step("m", x, y, expected_step=applied)
                        applied = r.step if not r.replayed else applied
                    except (tscale.Error, ValueError):
                        break
                killer.join()
                restarted = time.monotonic()
                g.servers[2].start(ready=False)
                g.client.close()
                g.client = tscale.ReplicaGroup([s.address for s in g.servers], retry_seconds=60)
                g.client.wait_ready(timeout=60)
                rejoin_seconds.append(time.monotonic() - restarted)
                states = g.states("m")
                self.assertEqual(len(set(states)), 1, f"cycle {cycle}: replicas differ")
                # The retry of the interrupted step: exactly once, whether or not it committed.
                r = g.client.train_step("m", x, y, expected_step=applied)
                self.assertEqual(r.step, applied + 1, f"cycle {cycle}")
                replays += r.replayed
                applied = r.step
                steps = [i.step for i in g.client.get_model("m")]
                self.assertEqual(steps, [applied] * 3, f"cycle {cycle}")
                r = g.client.train_step("m", x, y, expected_step=applied)
                applied = r.step
            self.assertEqual(len(set(g.states("m"))), 1)
            self.assertEqual([i.step for i in g.client.get_model("m")], [applied] * 3)
            print(f"\ngroup_test: 5 kills of rank 2 and restarts: the group at step {applied}, "
                  f"replicas identical; {replays} of 5 retries of the interrupted step were "
                  f"replays (committed before the kill), the rest applied once; from the "
                  f"restart to every rank serving the group: "
                  f"{', '.join(f'{s:.2f}' for s in rejoin_seconds)} s")
        finally:
            g.stop()

    def test_rank_0_killed_and_restarted(self):
        """Rank 0 hosts the store: the others wait for it, and when it is back (empty) the group
        re-forms on its new store and brings it forward."""
        g = Group(2).start()
        try:
            g.client.create_model("m", MLP, seed=9)
            for step in range(3):
                x, y = batch(step, 4, 16, 8)
                g.client.train_step("m", x, y, expected_step=step)
            g.servers[0].sigkill()
            # Rank 1 serves reads and inference meanwhile.
            with tscale.Client(g.servers[1].address, retries=0) as c1:
                self.assertEqual(c1.get_model("m").step, 3)
                c1.forward("m", batch(0, 2, 16, 8)[0])
            g.servers[0].start(ready=False)
            g.client.close()
            g.client = tscale.ReplicaGroup([s.address for s in g.servers], retry_seconds=60)
            g.client.wait_ready(timeout=90)
            self.assertEqual([i.step for i in g.client.get_model("m")], [3, 3])
            states = g.states("m")
            self.assertEqual(states[0], states[1])
            x, y = batch(3, 4, 16, 8)
            self.assertEqual(g.client.train_step("m", x, y, expected_step=3).step, 4)
            self.assertEqual(len(set(g.states("m"))), 1)
        finally:
            g.stop()

    def test_checkpoints_and_restart(self):
        # Every rank keeps its own checkpoint folder; the replicas being identical, so are the
        # folders' files, and a group restarted from them comes back identical on every rank.
        dirs = [tempfile.mkdtemp(prefix=f"tscale-group-ckpt-{r}-") for r in range(2)]
        metrics_ports = [free_port(), free_port()]
        g = Group(2)
        for r, server in enumerate(g.servers):
            server.args += ["--checkpoint-dir", dirs[r], "--checkpoint-every-steps", "4",
                            "--metrics-listen", f"127.0.0.1:{metrics_ports[r]}"]
        g.start()
        try:
            g.client.create_model("m", MLP, seed=6)
            for step in range(6):
                x, y = batch(step, 8, 16, 8)
                g.client.train_step("m", x, y, expected_step=step)
            # The group's metrics on every rank.
            for port in metrics_ports:
                text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics",
                                              timeout=10).read().decode()
                self.assertRegex(text, r'tscale_group\{field="size"\} 2\n')
                self.assertRegex(text, r'tscale_group\{field="formed"\} 1\n')
                self.assertRegex(text, r"tscale_group_exchange_seconds_count 6\n")
                sent = float(re.search(r"^tscale_group_exchange_bytes_total (\S+)$", text,
                                       re.M).group(1))
                self.assertGreater(sent, 0)
            before = g.states("m")
            self.assertEqual(g.stop(), [0, 0])  # SIGTERM: each rank checkpoints step 6
            listing = [sorted(os.listdir(os.path.join(d, "m"))) for d in dirs]
            self.assertEqual(listing[0], listing[1])
            for name in listing[0]:
                # The same tensors (the metadata says when each rank wrote its file).
                with open(os.path.join(dirs[0], "m", name), "rb") as a, \
                        open(os.path.join(dirs[1], "m", name), "rb") as b:
                    self.assertEqual(tensors(a.read()), tensors(b.read()), name)
            g.start()
            self.assertEqual(g.states("m"), before)
            x, y = batch(6, 8, 16, 8)
            self.assertEqual(g.client.train_step("m", x, y, expected_step=6).step, 7)
            self.assertEqual(len(set(g.states("m"))), 1)
        finally:
            if any(s.running() for s in g.servers):
                g.stop()
            for d in dirs:
                shutil.rmtree(d, ignore_errors=True)

    def test_a_member_restarted_from_an_old_checkpoint(self):
        """Rank 1 dies and comes back from an old copy of its checkpoint folder (step 2, the
        group at 5): the group brings it forward from rank 0, never rank 0 back, and trains on
        with identical replicas."""
        dirs = [tempfile.mkdtemp(prefix=f"tscale-group-old-{r}-") for r in range(2)]
        old = tempfile.mkdtemp(prefix="tscale-group-old-copy-")
        g = Group(2)
        for r, server in enumerate(g.servers):
            server.args += ["--checkpoint-dir", dirs[r], "--checkpoint-every-steps", "2"]
        g.start()
        try:
            g.client.create_model("m", MLP, seed=12)
            for step in range(2):
                x, y = batch(200 + step, 8, 16, 8)
                g.client.train_step("m", x, y, expected_step=step)
            wanted = os.path.join(dirs[1], "m", "step-00000002.safetensors")
            deadline = time.monotonic() + 30
            while not os.path.exists(wanted) and time.monotonic() < deadline:
                time.sleep(0.05)
            self.assertTrue(os.path.exists(wanted), "rank 1 wrote no checkpoint of step 2")
            time.sleep(0.2)  # the write is atomic (rename); let the folder settle
            shutil.rmtree(old)
            shutil.copytree(dirs[1], old)
            for step in range(2, 5):
                x, y = batch(200 + step, 8, 16, 8)
                g.client.train_step("m", x, y, expected_step=step)
            before = g.states("m")[0]
            g.servers[1].sigkill()
            shutil.rmtree(dirs[1])
            shutil.copytree(old, dirs[1])
            g.servers[1].start(ready=False)
            g.client.close()
            g.client = tscale.ReplicaGroup([s.address for s in g.servers], retry_seconds=60)
            g.client.wait_ready(timeout=60)
            log = g.servers[1].log()
            self.assertIn("brought forward from rank 0 (step 5", log)
            self.assertEqual([i.step for i in g.client.get_model("m")], [5, 5])
            self.assertEqual(g.states("m"), [before, before])
            x, y = batch(205, 8, 16, 8)
            self.assertEqual(g.client.train_step("m", x, y, expected_step=5).step, 6)
            self.assertEqual(len(set(g.states("m"))), 1)
            print("\ngroup_test: rank 1 restarted from its checkpoint of step 2 while the group "
                  "was at step 5: brought forward from rank 0, replicas identical at step 6")
        finally:
            if any(s.running() for s in g.servers):
                g.stop()
            for d in dirs + [old]:
                shutil.rmtree(d, ignore_errors=True)

    def test_cli_servers(self):
        cli = os.path.join(os.path.dirname(os.environ.get("TSCALE_SERVER_BIN") or
                                           os.path.join(os.path.dirname(__file__), "..", "..",
                                                        "build", "bin", "x")), "tscale")
        if not os.path.exists(cli):
            self.skipTest(f"no tscale CLI at {cli}")
        g = Group(2).start()
        try:
            servers = ",".join(s.address for s in g.servers)
            spec = os.path.join(os.path.dirname(g.servers[0].log_names[0]),
                                f"group-spec-{uuid.uuid4().hex[:6]}.json")
            with open(spec, "w") as f:
                import json
                json.dump(MLP, f)

            def run(*args):
                r = subprocess.run([cli, "--servers", servers, *args], capture_output=True,
                                   text=True, timeout=120)
                self.assertEqual(r.returncode, 0, f"tscale {' '.join(args)}: {r.stderr}")
                return r.stdout
            run("create", "c", "--spec", spec, "--seed", "5")
            out = run("train", "c", "--steps", "6", "--batch", "8")
            self.assertIn("(step 0 -> 6)", out)
            self.assertRegex(run("info", "c"), r"step: +6\n")
            self.assertEqual([i.step for i in g.client.get_model("c")], [6, 6])
            states = g.states("c")
            self.assertEqual(states[0], states[1])
            info = run("server-info")
            self.assertEqual(info.count("rank 0 of 2, formed") + info.count("rank 1 of 2, formed"),
                             2, info)
            run("delete", "c")
            self.assertEqual([len(c.list_models()) for c in g.client.clients], [0, 0])
            r = subprocess.run([cli, "--servers", servers, "export", "c", "/dev/null"],
                               capture_output=True, text=True)
            self.assertEqual(r.returncode, 2)
            self.assertIn("--servers: only create, info, train, delete and server-info", r.stderr)
            os.unlink(spec)
        finally:
            g.stop()

    @staticmethod
    def _quietly(fn):
        try:
            fn()
        except tscale.Error:
            pass


class NamespaceGroupTest(unittest.TestCase):
    """Rank 0 in this network namespace, rank 1 in another, joined by a veth pair: two hosts."""

    def setUp(self):
        self.ns = f"tsg{uuid.uuid4().hex[:6]}"
        # A /30 of its own, so that runs side by side do not share addresses.
        subnet = f"10.231.{int(self.ns[3:5], 16)}"
        self.host, self.peer = f"{subnet}.1", f"{subnet}.2"
        self.veth = f"v{self.ns}"
        if shutil.which("ip") is None:
            self.skipTest("group netns: skipped: no ip command (iproute2)")
        steps = [
            ["ip", "netns", "add", self.ns],
            ["ip", "link", "add", self.veth + "a", "type", "veth", "peer", "name", self.veth + "b"],
            ["ip", "link", "set", self.veth + "b", "netns", self.ns],
            ["ip", "addr", "add", self.host + "/30", "dev", self.veth + "a"],
            ["ip", "link", "set", self.veth + "a", "up"],
            ["ip", "netns", "exec", self.ns, "ip", "addr", "add", self.peer + "/30", "dev",
             self.veth + "b"],
            ["ip", "netns", "exec", self.ns, "ip", "link", "set", self.veth + "b", "up"],
            ["ip", "netns", "exec", self.ns, "ip", "link", "set", "lo", "up"],
        ]
        for cmd in steps:
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                self.tearDown()
                self.skipTest(f"group netns: skipped: '{' '.join(cmd)}' failed: "
                              f"{r.stderr.strip()}")

    def tearDown(self):
        subprocess.run(["ip", "link", "del", self.veth + "a"], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.ns], capture_output=True)

    def test_two_hosts(self):
        g = Group(2, store_host=self.host,
                  listen=[f"{self.host}:0", f"{self.peer}:0"],
                  prefixes=[(), ("ip", "netns", "exec", self.ns)])
        g.start()
        try:
            self.assertTrue(g.servers[1].address.startswith(self.peer))
            g.client.create_model("m", MLP, seed=4)
            for step in range(5):
                x, y = batch(step, 6, 16, 8)
                self.assertEqual(g.client.train_step("m", x, y, expected_step=step).step, step + 1)
            states = g.states("m")
            self.assertEqual(states[0], states[1])
            # The link goes down mid-training: group calls fail cleanly within the timeout.
            subprocess.run(["ip", "link", "set", self.veth + "a", "down"], check=True)
            x, y = batch(9, 6, 16, 8)
            start = time.monotonic()
            with self.assertRaises(tscale.Error) as cm:
                tscale.Client(g.servers[0].address, retries=0, timeout=60).train_step(
                    "m", x[:3], y[:3], expected_step=5)
            self.assertIn(cm.exception.code,
                          (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED))
            self.assertLess(time.monotonic() - start, TIMEOUT + 30)
            subprocess.run(["ip", "link", "set", self.veth + "a", "up"], check=True)
            # No split brain: the rank left alone committed nothing.
            with tscale.Client(g.servers[0].address, retries=0) as c0:
                self.assertEqual(c0.get_model("m").step, 5)
                self.assertEqual(c0.export_state("m"), states[0])
            subprocess.run(["ip", "link", "set", self.veth + "a", "up"], check=True)
            # Back up: the group re-forms and trains on.
            r = g.client.train_step("m", x, y, expected_step=5)
            self.assertEqual(r.step, 6)
            states = g.states("m")
            self.assertEqual(states[0], states[1])

            # The link cut in the middle of a longer step: whichever side of the commit the cut
            # fell, the retry after the link is back applies the step exactly once on both ranks
            # (a rank that missed the commit is brought forward and replays it).
            g.client.create_model("big", linear_spec(1024, 1024), seed=3)
            rng = np.random.RandomState(7)
            xb = rng.randn(512, 1024).astype(np.float32)
            yb = rng.randn(512, 1024).astype(np.float32)
            g.client.train_step("big", xb, yb, expected_step=0)
            outcome = {}
            once = tscale.ReplicaGroup([s.address for s in g.servers], retry_seconds=0,
                                       timeout=TIMEOUT + 30)

            def step():
                try:
                    outcome["result"] = once.train_step("big", xb, yb, expected_step=1)
                except (tscale.Error, ValueError) as e:
                    outcome["error"] = e
            t = threading.Thread(target=step, daemon=True)  # a failure must not hang the run
            t.start()
            time.sleep(0.05)
            subprocess.run(["ip", "link", "set", self.veth + "a", "down"], check=True)
            t.join(TIMEOUT + 60)
            self.assertFalse(t.is_alive(), "the call did not end within the group timeout")
            once.close()
            with tscale.Client(g.servers[0].address, retries=0) as c0:
                during = c0.get_model("big").step  # reads work on the live rank
            subprocess.run(["ip", "link", "set", self.veth + "a", "up"], check=True)
            g.client.wait_ready(timeout=60)
            r = g.client.train_step("big", xb, yb, expected_step=1)
            self.assertEqual(r.step, 2)
            self.assertEqual([i.step for i in g.client.get_model("big")], [2, 2])
            states = g.states("big")
            self.assertEqual(states[0], states[1])
            what = ("answered" if "result" in outcome
                    else f"failed with {outcome['error'].code.name}")
            print(f"\ngroup_test: link cut mid-step: the call {what}; rank 0 at step {during} "
                  f"during the cut; the retry after the link came back "
                  f"{'replayed' if r.replayed else 'applied'} step 2 once on both ranks")
        finally:
            g.stop()


if __name__ == "__main__":
    unittest.main()
