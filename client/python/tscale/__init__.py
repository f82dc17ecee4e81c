"""tscale: the Python client of the tscale training service.

    import tscale
    with tscale.Client("127.0.0.1:50051") as client:
        print(client.server_info())

- ``Client``: every call of the API (see tscale.client for return values and retries).
- ``Error``: what failed calls raise (``.code`` a grpc.StatusCode, ``.message``).
- ``to_tensor`` / ``to_numpy``: numpy arrays <-> the API's Tensor message.
- ``tscale.safetensors``: read and write state files (ExportState / ImportState).
- ``tscale.v1.trainer_pb2``: the generated API messages.

The package is assembled by the build under ``<build>/python`` (with the generated tscale.v1
modules); put that directory on PYTHONPATH.
"""

from tscale.errors import Error
from tscale.tensors import to_numpy, to_tensor
from tscale.client import (Client, ForwardResult, TrainStepResult, SERVICE_NAME, to_spec)
from tscale import safetensors
from tscale.v1 import trainer_pb2

__all__ = ["Client", "Error", "ForwardResult", "TrainStepResult", "SERVICE_NAME", "to_spec",
           "to_tensor", "to_numpy", "safetensors", "trainer_pb2"]
