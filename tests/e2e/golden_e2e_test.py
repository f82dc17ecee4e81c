"""The reference's golden cases, end to end: a real server, the Python client, state files.

For each model case in tests/data/golden: the `init.*` tensors become a state file (the spec in its
metadata, or a bare file with the spec in the import header), ImportState loads it, every step's
passes run Forward(train) and Backward(want_grad_input) against the expected output and input
gradient, UpdateCorrelation closes each step, and ExportState must hold the `final.*` tensors
exactly, with metadata step == steps.

The server runs on OpenBLAS and the vectors were made on the reference BLAS, so outputs and
gradients are compared within float32 rounding (rtol 1e-5, atol 1e-6); the integer state exactly.
"""

import json
import os
import unittest

import numpy as np

import tscale
from tscale import safetensors
from server_process import TEST_DATA, ServerTestCase

CASES = ["linear_basic", "linear_ragged_bias", "linear_gs16", "mlp", "grad_accum"]
RTOL, ATOL = 1e-5, 1e-6


def normalized(spec):
    """The spec with the proto's defaults spelt out (0 group size = 32, 0 threshold = 0.05), so
    that a server that fills them in compares equal."""
    spec = tscale.trainer_pb2.ModelSpec.FromString(spec.SerializeToString())

    def fill(layers):
        for layer in layers:
            kind = layer.WhichOneof("kind")
            if kind == "ternary_linear":
                tl = layer.ternary_linear
                tl.group_size = tl.group_size or 32
                tl.threshold = tl.threshold or 0.05
            elif kind == "ternary_rms_norm":
                layer.ternary_rms_norm.group_size = layer.ternary_rms_norm.group_size or 32
            elif kind == "residual":
                fill(layer.residual.layers)
    fill(spec.layers)
    return spec


def load_case(case):
    path = os.path.join(TEST_DATA, "golden", f"{case}.safetensors")
    return safetensors.load(path)


class GoldenE2ETest(ServerTestCase):

    def run_case(self, case, spec_in_metadata):
        tensors, md = load_case(case)
        spec_json = md["spec"]
        steps = int(md["steps"])
        passes = int(md["backwards_per_update"])
        init = {k[len("init."):]: v for k, v in tensors.items() if k.startswith("init.")}
        final = {k[len("final."):]: v for k, v in tensors.items() if k.startswith("final.")}
        self.assertTrue(init and final, f"{case}: no init./final. tensors")

        model_id = f"golden-{case}-{'md' if spec_in_metadata else 'header'}"
        if spec_in_metadata:
            data = safetensors.dumps(init, {"format": "tscale/1", "spec": spec_json,
                                            "step": "0"}, crc=True)
            info = self.client.import_state(model_id, data)
        else:
            data = safetensors.dumps(init)  # as the reference's state_dict: no metadata at all
            info = self.client.import_state(model_id, data, spec=spec_json)
        self.addCleanup(self._delete, model_id)
        self.assertEqual(info.model_id, model_id)
        self.assertEqual(info.step, 0)
        self.assertEqual(normalized(info.spec), normalized(tscale.to_spec(spec_json)))

        for s in range(steps):
            for p in range(passes):
                tag = f"step{s}.pass{p}" if passes > 1 else f"step{s}"
                with self.subTest(step=s, pass_=p):
                    y, pass_id, step = self.client.forward(model_id, tensors[f"{tag}.x"],
                                                           train=True)
                    self.assertEqual(step, s)
                    self.assertTrue(pass_id)
                    self.assertEqual(y.dtype, np.float32)
                    np.testing.assert_allclose(y, tensors[f"{tag}.y"], rtol=RTOL, atol=ATOL,
                                               err_msg=f"{case} {tag}.y")
                    grad_in = self.client.backward(model_id, pass_id, tensors[f"{tag}.grad_out"],
                                                   want_grad_input=True)
                    self.assertEqual(grad_in.dtype, np.float32)
                    np.testing.assert_allclose(grad_in, tensors[f"{tag}.grad_in"], rtol=RTOL,
                                               atol=ATOL, err_msg=f"{case} {tag}.grad_in")
            update = self.client.update_correlation(model_id, expected_step=s)
            self.assertEqual(update.step, s + 1)
            self.assertFalse(update.replayed)

        exported = self.client.export_state(model_id)
        got, got_md = safetensors.loads(exported)
        self.assert_state_equal(final, got, case)
        self.assertEqual(got_md.get("format"), "tscale/1")
        self.assertEqual(got_md.get("step"), str(steps))
        self.assertEqual(normalized(tscale.to_spec(got_md["spec"])),
                         normalized(tscale.to_spec(spec_json)))
        self.assertEqual(got_md.get("crc32c"),
                         safetensors.crc32c_hex(safetensors.data_section(exported)))
        self.assertEqual(self.client.get_model(model_id).step, steps)

        # The export imports back (replacing a model of another id is not needed: a new id).
        again = model_id + "-again"
        info = self.client.import_state(again, exported)
        self.addCleanup(self._delete, again)
        self.assertEqual(info.step, steps)
        self.assert_state_equal(final, safetensors.loads(self.client.export_state(again))[0],
                                case + " (re-imported)")

    def _delete(self, model_id):
        try:
            self.client.delete_model(model_id)
        except tscale.Error:
            pass


def _add_cases():
    for case in CASES:
        for with_md in (True, False):
            name = f"test_{case}_{'spec_in_metadata' if with_md else 'spec_in_header'}"
            setattr(GoldenE2ETest, name,
                    lambda self, c=case, m=with_md: self.run_case(c, m))


_add_cases()


class GoldenFilesTest(unittest.TestCase):
    """The client's safetensors reader on the golden files (no server)."""

    def test_reader_round_trip(self):
        for case in CASES + ["pack_codec"]:
            path = os.path.join(TEST_DATA, "golden", f"{case}.safetensors")
            with open(path, "rb") as f:
                raw = f.read()
            tensors, md = safetensors.loads(raw)
            self.assertTrue(tensors)
            again, md2 = safetensors.loads(safetensors.dumps(tensors, md))
            self.assertEqual(md, md2)
            for k, v in tensors.items():
                self.assertEqual(again[k].dtype, v.dtype)
                np.testing.assert_array_equal(again[k], v)
            if "spec" in md:
                json.loads(md["spec"])


if __name__ == "__main__":
    unittest.main()
