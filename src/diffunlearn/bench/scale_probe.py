"""The child process of ``diffunlearn bench scale``: runs one real ``diffunlearn`` command (``cli.main``) and records
when each unit of work ends, plus the FLOPs of one unit.

``python -m diffunlearn.bench.scale_probe RESULT.json UNIT -- <command line>`` where UNIT is ``step`` (an optimiser
step: ``torch.optim.Optimizer``'s global step post-hook) or ``forward`` (one UNet forward pass: a global module forward
hook on diffusers' ``UNet2DModel`` / ``UNet2DConditionModel``). The command's own code is not changed.

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` during the second unit only (between the ends of
units 1 and 2), so the first unit, which carries the warm-up, and every unit after the second run without the counter.
Its per-module tracking is replaced by one global bucket: the total is the same, and no module hooks are added.
"""

from __future__ import annotations

import json
import sys
import time


class _Flops:
    """FlopCounterMode entered and left from hooks, counting into one bucket (no ModuleTracker hooks)."""

    def __init__(self):
        from torch.utils.flop_counter import FlopCounterMode

        self.mode = FlopCounterMode(display=False)

        class _NoTracker:
            parents = {"Global"}

            def __enter__(self):
                return self

            def __exit__(self, *args):
                return None

        self.mode.mod_tracker = _NoTracker()
        self.active = False

    def start(self) -> None:
        self.mode.__enter__()
        self.active = True

    def stop(self) -> int:
        self.mode.__exit__(None, None, None)
        self.active = False
        return int(self.mode.get_total_flops())


def probe(command: list[str], unit: str) -> dict:
    """Run ``diffunlearn <command>`` in this process with the hooks installed, then remove them; the record of when
    each unit ended, the FLOPs of the second unit and the command's exit status."""
    import torch

    from ..cli import main as cli_main

    if unit not in ("step", "forward"):
        raise ValueError(f"unit must be step or forward, got {unit!r}")
    ends: list[float] = []
    record = {"unit": unit, "unit_ends": ends, "flops_per_unit": None, "counted_unit": None, "started": time.time()}
    counter = _Flops()

    def boundary() -> None:
        ends.append(time.time())
        if len(ends) == 1:
            counter.start()
        elif len(ends) == 2 and counter.active:
            record["flops_per_unit"] = counter.stop()
            record["counted_unit"] = 2

    if unit == "step":
        from torch.optim.optimizer import register_optimizer_step_post_hook

        handle = register_optimizer_step_post_hook(lambda opt, args, kwargs: boundary())
    else:
        from diffusers import UNet2DConditionModel, UNet2DModel

        def hook(module, args, output):
            if isinstance(module, (UNet2DModel, UNet2DConditionModel)):
                boundary()

        handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        record["returncode"] = cli_main(command)
    finally:
        handle.remove()
        if counter.active:  # the command ended before a second unit: count nothing rather than a partial unit
            counter.stop()
        record["finished"] = time.time()
    return record


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[2] != "--":
        raise SystemExit("usage: python -m diffunlearn.bench.scale_probe RESULT.json step|forward -- COMMAND...")
    result_path, unit, _, *command = argv
    record = {"returncode": 1}
    try:
        record = probe(command, unit)
    finally:
        with open(result_path, "w") as f:
            json.dump(record, f)
    return int(record.get("returncode") or 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
