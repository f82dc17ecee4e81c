"""tscale: the Python client of the tscale training service.

    import tscale
    with tscale.Client("127.0.0.1:50051") as client:
        print(client.server_info())

- ``Client``: every call of the API (see tscale.client for return values and retries).
- ``Error``: what failed calls raise (``.code`` a grpc.StatusCode, ``.message``).
- ``ReplicaGroup``: one client for a replica group of servers (``tscale.group``).
- ``to_tensor`` / ``to_numpy``: numpy arrays (or torch tensors) <-> the API's Tensor message.
- ``tscale.safetensors``: read and write state files (ExportState / ImportState).
- ``tscale.v1.trainer_pb2``: the generated API messages.
- ``tscale.torch`` (``import tscale.torch``; needs torch, which ``import tscale`` never imports):
  ``RemoteModel(client, model_id)``, a server's model as a ``torch.nn.Module`` whose backward runs
  the server's Backward, so that local layers before it get their gradients; ``update()`` runs
  UpdateCorrelation, exactly once.
- ``__version__``: the version of this client, the project's (the server reports its own in
  ``server_info().version``).

The package is assembled by the build under ``<build>/python`` (with the generated tscale.v1
modules); put that directory on PYTHONPATH.
"""

__version__ = "0.1.0"  # the project's version (CMakeLists.txt); a test holds them equal

from tscale.errors import Error
from tscale.tensors import to_numpy, to_tensor
from tscale.client import (Client, ForwardResult, TrainStepResult, SERVICE_NAME, to_spec)
from tscale.group import GroupError, ReplicaGroup
from tscale import safetensors
from tscale.v1 import trainer_pb2

__all__ = ["Client", "Error", "GroupError", "ReplicaGroup", "ForwardResult", "TrainStepResult", "SERVICE_NAME", "to_spec",
           "to_tensor", "to_numpy", "safetensors", "trainer_pb2"]
