"""One small logging interface: a rank-0 progress bar, TensorBoard scalars, a summary table."""

from __future__ import annotations

from pathlib import Path

from carl_scale.tables import progress_bar


class RunLogger:
    def __init__(self, run_dir: str | Path, total_steps: int, start_step: int, enabled: bool):
        self.enabled = enabled
        self.bar = None
        self.tb = None
        if not enabled:
            return
        self.bar = progress_bar(total=total_steps, initial=start_step, desc="pretrain", unit="step")
        from torch.utils.tensorboard import SummaryWriter

        # A resumed run drops what the interrupted one logged after its checkpoint (a run started
        # again from step 0, all of it): steps logged twice would draw every curve back and forth.
        self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=start_step + 1)

    def step(self, step: int, scalars: dict[str, float], show: bool) -> None:
        if not self.enabled:
            return
        self.bar.update(1)
        if show:
            for k, v in scalars.items():
                self.tb.add_scalar(f"train/{k}", v, step)
            self.bar.set_postfix(loss=f"{scalars['loss']:.4f}", samples_s=f"{scalars['samples_per_s']:.1f}",
                                 data_wait=f"{100 * scalars['data_wait']:.0f}%", refresh=False)

    def scalars(self, prefix: str, values: dict[str, float], step: int) -> None:
        if self.enabled:
            for k, v in values.items():
                self.tb.add_scalar(f"{prefix}/{k}", v, step)

    def image(self, tag: str, path: str | Path, step: int) -> None:
        """A PNG written elsewhere (a hook's picture), shown among TensorBoard's images."""
        if self.enabled:
            import numpy as np
            from PIL import Image

            with Image.open(path) as img:
                self.tb.add_image(tag, np.asarray(img.convert("RGB")), step, dataformats="HWC")

    def end_progress(self) -> None:
        if self.bar is not None:
            self.bar.close()  # idempotent

    def close(self) -> None:
        if self.enabled:
            self.bar.close()
            self.tb.close()
