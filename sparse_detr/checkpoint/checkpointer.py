"""The checkpointer of training and evaluation: atomic writes, no non-finite weights, no silently skipped tensors."""

import contextlib
import os
from typing import Any, BinaryIO, Callable, Dict, List, Optional

import torch
from detectron2.checkpoint import DetectionCheckpointer
from torch import nn

from ..modeling.heads import PRIOR_PROB, DetectionHeads

__all__ = ["PARTIAL_SUFFIX", "SparseDetrCheckpointer"]

# a file being written is `.<name><PARTIAL_SUFFIX>` until it is complete
PARTIAL_SUFFIX = ".partial"


class SparseDetrCheckpointer(DetectionCheckpointer):
    """detectron2's ``DetectionCheckpointer`` with three changes.

    - Writes are atomic: a checkpoint (and ``last_checkpoint``) is written to a hidden file in the same folder, then
      renamed over its name. A kill or a full disk during a save leaves the previous files as they were, and
      ``last_checkpoint`` only ever names a complete file. A partial file of a killed save is removed by the next.
    - A model holding NaN or infinity is not saved (``FloatingPointError``): a diverged run cannot be resumed from
      a checkpoint of non-finite weights.
    - A tensor whose shape differs from the model's is an error naming it and both shapes, where detectron2 skips
      it with a warning. Except with ``fine_tune``, when ``MODEL.WEIGHTS`` is loaded (not when a run is resumed):
      class heads trained for another number of classes are not loaded and stay as a new model builds them (bias
      at the prior probability), with one log line that says so; so does every other table of one row per class
      that the model names (``class_indexed_modules()``: the denoising label embedding).

    Args:
        model, save_dir, checkpointables: as ``DetectionCheckpointer``'s.
        fine_tune: let the class heads of ``MODEL.WEIGHTS`` have another number of classes (training).
    """

    def __init__(self, model: nn.Module, save_dir: str = "", *, fine_tune: bool = False, **checkpointables: Any):
        super().__init__(model, save_dir, **checkpointables)
        self.fine_tune = fine_tune
        self._loading: Optional[str] = None  # the file and how it is loaded, for _load_model's messages
        self._fit_class_heads = False

    # ------------------------------------------------------------------------------------------------ saving
    def save(self, name: str, **kwargs: Any) -> None:
        """Write ``save_dir/name.pth`` atomically with the model, the checkpointables and ``kwargs``, then name it
        in ``last_checkpoint``.

        Raises:
            FloatingPointError: the model holds NaN or infinity (nothing is written).
        """
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        self._check_finite(data["model"], name, kwargs.get("iteration"))
        basename = f"{name}.pth"
        self.logger.info(f"Saving checkpoint to {os.path.join(self.save_dir, basename)}")
        self._write_atomically(basename, lambda f: torch.save(data, f))
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        self._write_atomically("last_checkpoint", lambda f: f.write(last_filename_basename.encode()))

    def _write_atomically(self, basename: str, write: Callable[[BinaryIO], Any]) -> None:
        for stale in os.listdir(self.save_dir):  # left by a killed save; only the main process saves
            if stale.startswith(".") and stale.endswith(PARTIAL_SUFFIX):
                os.remove(os.path.join(self.save_dir, stale))
        partial = os.path.join(self.save_dir, f".{basename}{PARTIAL_SUFFIX}")
        try:
            with open(partial, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(partial, os.path.join(self.save_dir, basename))
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.remove(partial)
            raise

    def _check_finite(self, state_dict: Dict[str, torch.Tensor], name: str, iteration: Optional[int]) -> None:
        floats = {k: v for k, v in state_dict.items() if v.is_floating_point()}
        finite = torch.stack([v.isfinite().all() for v in floats.values()]).tolist()  # one host sync
        bad = [k for k, ok in zip(floats, finite) if not ok]
        if bad:
            at = "" if iteration is None else f" after iteration {iteration}"
            shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
            raise FloatingPointError(
                f"Not saving checkpoint {name}{at}: the model's {shown} hold NaN or infinity (training diverged); "
                f"last_checkpoint still names {os.path.basename(self.get_checkpoint_file()) or 'no checkpoint'}"
            )

    # ------------------------------------------------------------------------------------------------ loading
    def load(self, path: str, checkpointables: Optional[List[str]] = None) -> Dict[str, Any]:
        # MODEL.WEIGHTS is loaded without checkpointables (resume_or_load(resume=False)); a resumed run restores all
        self._fit_class_heads = self.fine_tune and checkpointables == []
        self._loading = f"{path} ({'resumed' if checkpointables is None else 'MODEL.WEIGHTS'})"
        return super().load(path, checkpointables)

    def _load_model(self, checkpoint: Dict[str, Any]):
        incompatible = super()._load_model(checkpoint)  # loads what fits, lists the tensors of other shapes
        heads = getattr(self.model, "heads", None)
        class_heads = set(heads.class_head_names()) if isinstance(heads, DetectionHeads) else set()
        per_class = class_heads | set(getattr(self.model, "class_indexed_modules", lambda: [])())
        refit = [
            (key, saved, wanted)
            for key, saved, wanted in incompatible.incorrect_shapes
            if key.rsplit(".", 1)[0] in per_class and saved[1:] == wanted[1:]
        ]
        others = len(incompatible.incorrect_shapes) - len(refit)
        if incompatible.incorrect_shapes and (others or not self._fit_class_heads):
            shapes = "; ".join(
                f"{key}: {tuple(saved)} in the checkpoint, {tuple(wanted)} in the model"
                for key, saved, wanted in incompatible.incorrect_shapes
            )
            if self._fit_class_heads:
                hint = "only the class heads may have another number of classes when fine-tuning"
            elif self.fine_tune:
                hint = (
                    "a resumed run must have the shapes it was saved with; to start from these weights with the new "
                    "config, train in a new OUTPUT_DIR with MODEL.WEIGHTS set to this file"
                )
            else:
                hint = "the checkpoint was trained with another config"
            raise ValueError(
                f"Cannot load {self._loading}: tensors of other shapes than the model's: {shapes} ({hint})"
            )
        if refit:
            keys = {key for key, _, _ in refit}
            incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if k not in keys]
            incompatible.incorrect_shapes.clear()
            modules = {key.rsplit(".", 1)[0] for key in keys}
            names = sorted(modules & class_heads, key=lambda n: int(n.rsplit(".", 1)[1]))
            tables = sorted(modules - class_heads)
            parts = [f"class heads {', '.join(names)}"] if names else []
            if tables:
                parts.append(f"{', '.join(tables)} (one row per class)")
            what = " and ".join(parts)
            prior = f" (bias at the prior probability {PRIOR_PROB})" if names else ""
            self.logger.info(
                f"Fine-tuning: {what} not loaded from {self._loading}: they score {refit[0][1][0]} classes there "
                f"and MODEL.SPARSE_DETR.NUM_CLASSES is {refit[0][2][0]}; they start as a new model's{prior}"
            )
        return incompatible
