"""A step's metrics in one accumulator: each key says how it reduces over micro-batches and ranks, values stay on
the device as they are added, and one collective at the end of the step reduces them all.

Kinds:
- `TOKEN_MEAN`: a per-micro-batch mean over loss tokens; the step's value is the mean weighted by each micro-batch's
  token count, over all micro-batches (of every PPO epoch) and ranks.
- `LOSS_SHARE`: a micro-batch's share of the batch loss (normalised by the whole batch, over the world size, see
  `Trainer.update`): summed over micro-batches and ranks, divided by the world size and averaged over PPO epochs.
- `SUM`: summed over everything (counts, totals); divided by `copies` when each value is added alike by that many
  ranks (the ranks of a sequence-parallel group hold the same samples).
(`LOSS_SHARE` needs no such division: a group's ranks add the same share, and the trainer's normaliser counts each of
them, see `Trainer.update`.)
- `MAX`: the largest value anywhere.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

TOKEN_MEAN, LOSS_SHARE, SUM, MAX = "token_mean", "loss_share", "sum", "max"


class StepMetrics:
    def __init__(self, device, world_size: int = 1, epochs: int = 1, copies: int = 1):
        self.device, self.loss_divisor, self.copies = device, float(world_size * epochs), float(copies)
        self.kinds: dict[str, str] = {}
        self.values: dict[str, torch.Tensor] = {}
        self.weights: dict[str, torch.Tensor] = {}

    def _tensor(self, value) -> torch.Tensor:
        return torch.as_tensor(value, device=self.device).detach().to(torch.float64)

    def add(self, name: str, value, kind: str, weight=None) -> None:
        """Add a scalar (float or 0-dim tensor, kept on the device); `weight` (the tokens it averages over) for
        TOKEN_MEAN."""
        if self.kinds.setdefault(name, kind) != kind:
            raise ValueError(f"metric {name!r} is {self.kinds[name]}, not {kind}")
        value = self._tensor(value)
        if kind == TOKEN_MEAN:
            weight = self._tensor(weight)
            value = value * weight
            self.weights[name] = self.weights[name] + weight if name in self.weights else weight
        if name not in self.values:
            self.values[name] = value
        else:
            self.values[name] = torch.maximum(self.values[name], value) if kind == MAX else self.values[name] + value

    def reduce(self) -> dict[str, float]:
        """Every metric over all ranks, in one collective and one transfer to the host (collective: every rank
        must call it, with the same keys added in the same order)."""
        names = list(self.values)
        local = torch.stack([self.values[n] for n in names] + [self.weights[n] for n in names if n in self.weights])
        ranks = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if ranks > 1:
            gathered = [torch.empty_like(local) for _ in range(ranks)]
            dist.all_gather(gathered, local)
        else:
            gathered = [local]
        rows = torch.stack(gathered)
        total = rows[0].clone()
        for row in rows[1:]:  # rank order, as an all-reduce sums them
            total += row
        summed, top = total.tolist(), rows.max(0).values.tolist()
        weights = dict(zip([n for n in names if n in self.weights], summed[len(names) :]))
        result = {}
        for i, name in enumerate(names):
            kind = self.kinds[name]
            result[name] = (
                summed[i] / max(weights[name], 1.0)
                if kind == TOKEN_MEAN
                else summed[i] / self.loss_divisor
                if kind == LOSS_SHARE
                else top[i]
                if kind == MAX
                else summed[i] / self.copies
            )
        return result
