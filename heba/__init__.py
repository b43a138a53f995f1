"""heba: fused, exact kernels for HeBA and AdapterTune adapters on frozen CLIP / ViT models.

``heba.nn`` holds the modules, ``heba.ops`` the functional API,
``heba.backends`` the backend registry; ``python -m heba.info`` prints what is
available on this machine.
"""

from heba import nn, ops  # noqa: F401
from heba.backends import BackendUnavailableError, backend_status  # noqa: F401

__version__ = "0.1.0"
