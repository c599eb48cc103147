"""Whether a run compiles (torch.compile) its models and its loss blocks, decided once.

`--compile` asks for it, `--no-compile` refuses it, and neither leaves it to `auto`:
- On the CPU, off. Measured on a 2-core AMX Xeon (docs/performance.md): the compiled model
  bodies ran 1.05x eager after 46 s of compilation, and the compiled block loss 0.58-0.69x
  eager (inductor keeps several (block, V) intermediates where the eager block reuses four
  buffers), so `--compile` on the CPU compiles the models only.
- On a GPU, on for runs of at least AUTO_MIN_STEPS steps: inductor fuses the small element-wise
  kernels of the bodies and the ~20 passes of each loss block over (block, V) into a few, and
  compilation (tens of seconds) should be repaid within a few hundred steps. This half is not
  measured yet; benchmarks/gpu.sh's step section times it. A compilation error under `auto`
  falls back to eager instead of ending a run nobody asked to compile.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

AUTO_MIN_STEPS = 500


@dataclass(frozen=True)
class CompileChoice:
    models: bool  # the student's and the teacher's forward passes
    loss_blocks: bool  # the block loss's softmaxes, divergence and gradient
    reason: str

    @property
    def any(self) -> bool:
        return self.models or self.loss_blocks


def choose_compile(requested: bool | None, device: torch.device, steps: int) -> CompileChoice:
    """What to compile for a run of `steps` steps on `device`; `requested` None means auto."""
    gpu = device.type == "cuda"
    if requested is False:
        return CompileChoice(False, False, "--no-compile")
    if requested:
        why = "--compile" if gpu else "--compile (the loss blocks stay eager on the CPU)"
        return CompileChoice(True, gpu, why)
    if not gpu:
        return CompileChoice(False, False, "auto: off on the CPU")
    if steps < AUTO_MIN_STEPS:
        return CompileChoice(False, False, f"auto: off for runs under {AUTO_MIN_STEPS} steps")
    return CompileChoice(True, True, f"auto: on for GPU runs of {AUTO_MIN_STEPS}+ steps")


def fall_back_to_eager() -> None:
    """Under `auto`, a graph that fails to compile runs eagerly instead of raising."""
    import torch._dynamo  # only runs that compile pay for importing it

    torch._dynamo.config.suppress_errors = True
