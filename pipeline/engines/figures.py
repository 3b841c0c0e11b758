"""The training's reconstruction figure: input, reconstruction, CE-masked input and its reconstruction."""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import torch
from ignite.engine import Engine, Events

from pipeline.data.context_encoding import ContextEncodingNoise
from pipeline.data.slices import centre_slice
from pipeline.display import display_window
from pipeline.io import atomic_path
from pipeline.weights import load_trained

__all__ = ["ReconstructionFigure"]


class ReconstructionFigure:
    """At the end of training, save a figure of input, reconstruction, CE-masked input and its reconstruction, drawn
    with the kept checkpoint.

    Args:
        path: PNG to write (atomically).
        network: the trained :class:`~pipeline.networks.CeVAE`.
        checkpoint: the kept ``model.pt`` (the best validation ELBO): when it exists at the end, the figure shows its
            weights (in a copy of ``network``), the model that calibration, evaluation and inference use, not the
            last epoch's; None or missing: ``network`` as trained.
        dataset: slices to show from (items with ``image`` ``(1, H, W)``, and ``brainmask`` if it has one), e.g. the
            validation slices. Every panel is drawn with one grey-scale window, :func:`display_window` of the inputs.
        context_encoding: the CE noise used in training.
        n_slices: slices shown (evenly spaced through ``dataset``).
        seed: seed of the CE noise drawn for the figure.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        network: torch.nn.Module,
        dataset: Sequence[dict],
        context_encoding: ContextEncodingNoise | None = None,
        n_slices: int = 4,
        seed: int = 0,
        checkpoint: str | os.PathLike | None = None,
    ) -> None:
        self.path, self.network, self.dataset = Path(path), network, dataset
        self.checkpoint = None if checkpoint is None else Path(checkpoint)
        self.context_encoding = context_encoding or ContextEncodingNoise()
        self.n_slices, self.seed = n_slices, seed

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def shown_network(self) -> tuple[torch.nn.Module, str]:
        """The network the figure shows and what it is: ``checkpoint``'s weights in a copy of ``network`` when the
        file exists, else ``network`` itself."""
        net = getattr(self.network, "module", self.network)
        if self.checkpoint is None or not self.checkpoint.is_file():
            return net, "the last epoch's network"
        kept = copy.deepcopy(net)
        load_trained(self.checkpoint, kept, device=next(net.parameters()).device)
        return kept, f"{self.checkpoint.name} (best validation ELBO)"

    @torch.no_grad()
    def __call__(self, engine: Engine) -> None:
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        net, shown = self.shown_network()
        device = next(net.parameters()).device
        picks = torch.linspace(0, len(self.dataset) - 1, self.n_slices).round().long().unique().tolist()
        items = [self.dataset[i] for i in picks]
        x = torch.stack([item["image"] for item in items]).to(device)
        masks = torch.stack([item["brainmask"] for item in items]) if "brainmask" in items[0] else None
        k = getattr(net, "context_slices", 0)  # a 2.5D network's inputs: the middle slice is shown
        low, high = display_window(centre_slice(x.cpu(), k), masks)
        x_ce, _ = self.context_encoding(x.cpu(), torch.Generator().manual_seed(self.seed))
        was_training = net.training
        net.eval()
        rows = {"input": x, "reconstruction": net.decode(net.encode(x)[0]), "CE input": x_ce.to(device)}
        rows["CE reconstruction"] = net.decode(net.encode(rows["CE input"])[0])
        rows = {name: centre_slice(images, k) for name, images in rows.items()}
        net.train(was_training)
        fig, axes = plt.subplots(len(rows), len(picks), figsize=(2 * len(picks), 2 * len(rows)), squeeze=False)
        for r, (name, images) in enumerate(rows.items()):
            for c in range(len(picks)):
                axes[r, c].imshow(images[c, 0].float().cpu().T, cmap="gray", vmin=low, vmax=high, origin="lower")
                axes[r, c].set_xticks([])
                axes[r, c].set_yticks([])
            axes[r, 0].set_ylabel(name)
        fig.suptitle(
            f"{shown}, after {engine.state.epoch} epochs\ngrey scale {low:.2f} to {high:.2f}: the inputs' brain"
        )
        fig.tight_layout()
        with atomic_path(self.path, ".png") as tmp:
            fig.savefig(tmp)
        plt.close(fig)
