"""Learned weighted fusion of several vision-encoder blocks (IADGPT "adaptive weighted module").

Industrial defects are often low-level (a scratch, a stain), and the last vision block of an
LVLM is tuned for semantics; mixing in earlier blocks keeps the fine detail. The fused output
replaces the last block's output as the input of Qwen2.5-VL's patch merger.

Every vision block works on the same window-permuted patch order, so an element-wise weighted sum
of several blocks' outputs is valid before the merger (which un-permutes afterwards).
"""

from __future__ import annotations

import math

import torch
from torch import nn


class VisualLayerFusion(nn.Module):
    """Softmax-weighted sum of the outputs of chosen vision blocks.

    Attached to the vision tower as `visual.layer_fusion` and called from a pre-hook of the patch
    merger, so its parameter lives in a module whose forward runs (ZeRO-3 gathers per module).
    """

    def __init__(self, layers: list[int], init_last_weight: float | None = None):
        super().__init__()
        self.layers = list(layers)
        self.init_last_weight = init_last_weight
        self.logits = nn.Parameter(self.initial_logits())
        self._captured: dict[int, torch.Tensor] = {}
        self._capturing = False
        self._fused: torch.Tensor | None = None

    def initial_logits(self) -> torch.Tensor:
        n = len(self.layers)
        logits = torch.zeros(n)
        if self.init_last_weight is not None and n > 1:
            # softmax gives the last layer `w` and each other layer (1 - w) / (n - 1).
            w = self.init_last_weight
            logits[-1] = math.log(w * (n - 1) / (1 - w))
        return logits

    def layer_weights(self) -> torch.Tensor:
        return self.logits.float().softmax(-1)

    def forward(self, block_outputs: list[torch.Tensor]) -> torch.Tensor:
        weights = self.layer_weights()
        fused = sum(w * h.float() for w, h in zip(weights, block_outputs))
        return fused.to(block_outputs[-1].dtype)

    # -- hooks that feed it ---------------------------------------------------------------------
    def attach(self, visual: nn.Module) -> None:
        """Capture the chosen blocks' outputs during the tower's forward and fuse them at the merger.

        The tower's output `last_hidden_state` then holds the fused patches (what the merger saw,
        as it does without fusion), which the in-context residuals compare patch by patch.
        """
        visual.register_forward_pre_hook(self._start_capture)
        for layer in self.layers:
            visual.blocks[layer - 1].register_forward_hook(self._capture_hook(layer))
        visual.merger.register_forward_pre_hook(self._fuse_before_merger)
        visual.register_forward_hook(self._report_fused)

    def _start_capture(self, module, args):
        self._captured = {}
        self._capturing = True
        self._fused = None

    def _capture_hook(self, layer: int):
        def hook(module, args, output):
            # Only during the tower's forward: a gradient-checkpointing recompute in backward
            # runs the blocks again and must not refill the buffer.
            if self._capturing:
                self._captured[layer] = output

        return hook

    def _fuse_before_merger(self, module, args):
        if not self._capturing:
            return None
        self._capturing = False
        outputs = [self._captured.pop(layer) for layer in self.layers]
        self._captured = {}
        self._fused = self(outputs)
        return (self._fused,) + tuple(args[1:])

    def _report_fused(self, module, args, output):
        fused, self._fused = self._fused, None
        if fused is not None and hasattr(output, "last_hidden_state"):
            output.last_hidden_state = fused
        return output
