"""Logit lens (nostalgebraist, "interpreting GPT: the logit lens", 2020; the per-layer loss and
agreement readout of Belrose et al., "Eliciting Latent Predictions from Transformers with the Tuned
Lens", 2023, §2): decode every hidden state h_ℓ with the model's own final norm and LM head,
softmax(W_U · norm(h_ℓ)), as if the remaining blocks were skipped.

Per hidden state, streamed over batches:
  logit_lens_loss       mean next-token cross-entropy (nats) of the decoded h_ℓ, over the tokens
                        that have a next token in their window;
  logit_lens_agreement  fraction of tokens whose top-1 decoded token equals the final layer's
                        (h_L decoded, i.e. the model's own prediction; 1 at h_L).
"""
from __future__ import annotations

from typing import Callable

import torch

LENS_ROWS = 1024  # tokens decoded at once: logits are (rows × vocabulary), kept small


class LogitLensAccumulator:
    def __init__(self, decode: Callable[[torch.Tensor], torch.Tensor]):
        """decode: (n, d) hidden states → (n, vocabulary) logits (final norm, then LM head)."""
        self.decode = decode
        self.n_tokens = 0
        self.n_targets = 0
        self._loss: list[float] = []
        self._agree: list[int] = []

    @torch.no_grad()
    def update(self, states: list[torch.Tensor], targets: torch.Tensor) -> None:
        """states: h_0…h_L, each (n_valid_tokens, d); targets: each token's next token id, −100
        where the window ends."""
        if not self._loss:
            self._loss, self._agree = [0.0] * len(states), [0] * len(states)
        targets = targets.to(states[0].device)
        for start in range(0, states[0].shape[0], LENS_ROWS):
            rows = slice(start, start + LENS_ROWS)
            final = self.decode(states[-1][rows]).float()
            top_final = final.argmax(dim=-1)
            for i, h in enumerate(states):
                logits = final if i == len(states) - 1 else self.decode(h[rows]).float()
                self._loss[i] += float(torch.nn.functional.cross_entropy(
                    logits, targets[rows], ignore_index=-100, reduction="sum"))
                self._agree[i] += int((logits.argmax(dim=-1) == top_final).sum())
        self.n_tokens += states[0].shape[0]
        self.n_targets += int((targets != -100).sum())

    def metrics(self) -> list[dict]:
        """Per hidden state: {"logit_lens_loss", "logit_lens_agreement"}."""
        return [{"logit_lens_loss": loss / self.n_targets if self.n_targets else None,
                 "logit_lens_agreement": agree / self.n_tokens if self.n_tokens else None}
                for loss, agree in zip(self._loss, self._agree)]


def next_token_targets(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """For a padded (batch, seq) batch: each valid token's next token id within its window, −100 for
    a window's last token; flattened over valid tokens in the same order as capture's states."""
    mask = attention_mask.bool()
    targets = torch.full_like(input_ids, -100)
    has_next = mask[:, :-1] & mask[:, 1:]
    targets[:, :-1][has_next] = input_ids[:, 1:][has_next]
    return targets[mask]
