"""Patch of ``vllm.distributed.parallel_state.GroupCoordinator`` (vLLM 0.6.2, CPU build only).

Tensor parallelism on vLLM's CPU executor fails in two places of the group coordinator:

* ``__init__`` builds a ``PyNcclCommunicator`` for every model-parallel group of more than one rank.
  With the ``nvidia-nccl`` wheel present (torch depends on it) the library loads and the communicator
  then enters torch's CUDA device context with a CPU device, which fails ("Expected a CUDA device, but
  got: cpu"). On the CPU build the
  communicator (and the custom CUDA all-reduce) can never work, so both are turned off there.
* ``_all_reduce`` sends CPU tensors to ``intel_extension_for_pytorch``'s all-reduce, which vLLM 0.6.2
  does not install or require. Without IPEX the patched method uses ``torch.distributed.all_reduce`` on
  the group's own process group, which the CPU worker creates with the gloo backend. With IPEX
  installed vLLM's own path is kept (its shared-memory all-reduce is faster).
* ``all_gather`` (column layers that gather their output) hands gloo an output of shape
  ``(world_size, *input.shape)``; gloo's all-gather wants the ranks' pieces concatenated along the first
  dimension ("ProcessGroupGloo::allgather: invalid tensor size"). For CPU tensors the patched method
  gathers into that layout and then reshapes exactly as vLLM does.

Known from vLLM 0.6.2+cpu; refuses other vLLM versions like every patch; does nothing on other builds.

Decode step: on the CPU build, the all-reduce of row-parallel layers and the all-gather of gathered
column layers at TP > 1 go through the patched methods.
"""
from __future__ import annotations

import importlib.util

from ._base import require_parameters, wrap
from ._cpu import CpuBuildPatch


def _has_ipex() -> bool:
    return importlib.util.find_spec("intel_extension_for_pytorch") is not None


class CpuGroupCoordinatorPatch(CpuBuildPatch):
    name = "cpu_group_coordinator"
    target = ("vllm.distributed.parallel_state.GroupCoordinator: no NCCL communicator on the CPU build, "
              "gloo all-reduce without IPEX, gloo-shaped all-gather")

    wraps = tuple(("vllm.distributed.parallel_state:GroupCoordinator", attr)
                  for attr in ("__init__", "_all_reduce", "all_gather"))

    def _apply(self) -> None:
        import torch

        owner = self.owner()
        require_parameters(owner.__init__, ["use_pynccl", "use_custom_allreduce"], self.target)
        require_parameters(owner._all_reduce, ["input_"], self.target)
        require_parameters(owner.all_gather, ["input_", "dim"], self.target)

        def make_init(original):
            def __init__(self, *args, **kwargs):
                # Only keyword calls exist in vLLM 0.6.2 (init_world_group, init_model_parallel_group).
                kwargs["use_pynccl"] = False
                kwargs["use_custom_allreduce"] = False
                original(self, *args, **kwargs)

            return __init__

        ipex = _has_ipex()

        def make_all_reduce(original):
            def _all_reduce(self, input_):
                if ipex or not input_.is_cpu or self.pynccl_comm is not None or self.ca_comm is not None:
                    return original(self, input_)
                torch.distributed.all_reduce(input_, group=self.device_group)
                return input_

            return _all_reduce

        def make_all_gather(original):
            def all_gather(self, input_, dim=-1):
                if self.world_size == 1 or not input_.is_cpu or input_.dim() == 0:
                    return original(self, input_, dim)
                if dim < 0:
                    dim += input_.dim()
                size = input_.size()
                flat = torch.empty((self.world_size * size[0],) + size[1:], dtype=input_.dtype, device=input_.device)
                torch.distributed.all_gather_into_tensor(flat, input_.contiguous(), group=self.device_group)
                output = flat.view((self.world_size,) + size).movedim(0, dim)
                return output.reshape(size[:dim] + (self.world_size * size[dim],) + size[dim + 1:])

            return all_gather

        wrap(owner, "__init__", self.name, make_init)
        wrap(owner, "_all_reduce", self.name, make_all_reduce)
        wrap(owner, "all_gather", self.name, make_all_gather)
