"""``python run_with_loss_log.py SCRIPT ARGS...``: runs a training script (train_net.py) as ``python SCRIPT ARGS``
would, with a hook that appends every iteration's raw losses to the JSON-lines file ``$LOSS_LOG``.

detectron2's own writers log medians over 20 iterations, which a resumed run (with a fresh history) cannot
reproduce; the raw values can be compared exactly."""

import json
import os
import runpy
import sys

script = os.path.abspath(sys.argv[1])
sys.path.insert(0, os.path.dirname(script))  # as `python SCRIPT` would

from detectron2.engine import HookBase  # noqa: E402

from sparse_detr.engine import Trainer  # noqa: E402


class LogLosses(HookBase):
    def after_step(self):
        latest = self.trainer.storage.latest()
        losses = {k: v for k, (v, _) in latest.items() if k == "total_loss" or k.startswith("loss_")}
        with open(os.environ["LOSS_LOG"], "a") as f:
            f.write(json.dumps({"iteration": self.trainer.iter, **losses}) + "\n")


build_hooks = Trainer.build_hooks
Trainer.build_hooks = lambda self: build_hooks(self) + [LogLosses()]
sys.argv = sys.argv[1:]
runpy.run_path(script, run_name="__main__")
