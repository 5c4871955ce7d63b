"""What every rollout returns: `RolloutOutput`, DeepSpeed's `RolloutBatch` plus response masks, how each response
ended, which prompt it answers and, from a sampler that gives them, its own log-probs of the tokens; built from
generate's output ids by `finish_rollout`, several joined by `concat_rollouts`. Pure tensor code."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from deepspeed.runtime.rollout import RolloutBatch


@dataclass
class RolloutOutput(RolloutBatch):
    """A RolloutBatch whose rows also say which tokens were generated and how each response ended."""

    response_mask: torch.Tensor  # [B', T] bool: generated tokens, up to and including the first EOS
    eos: torch.Tensor  # [B'] bool: the response ended with EOS
    truncated: torch.Tensor  # [B'] bool: the response hit max_new_tokens without EOS
    prompt_index: torch.Tensor  # [B'] long: the request row each sample answers
    # [B', T] float32: the sampler's log-prob of each generated token at the sampling temperature (after top-k / top-p),
    # 0 elsewhere; None from a rollout that does not return them (transformers' generate runs the trainer's model).
    rollout_logprobs: torch.Tensor | None = None

    @property
    def response_lengths(self) -> torch.Tensor:
        return self.response_mask.sum(-1)


def finish_rollout(
    prompt_mask: torch.Tensor,
    output_ids: torch.Tensor,
    n_samples: int,
    eos_token_ids,
    pad_token_id: int,
    response_logprobs: torch.Tensor | None = None,
) -> RolloutOutput:
    """Turn generate's [B', T_p + T_r] output into a RolloutOutput: keep the first EOS, pad after it.
    `response_logprobs` ([B', T_r], the sampler's) become `rollout_logprobs`, 0 after the first EOS."""
    prompt_len = prompt_mask.shape[1]
    response = output_ids[:, prompt_len:]
    eos_ids = torch.as_tensor(eos_token_ids, device=output_ids.device).flatten()
    is_eos = torch.isin(response, eos_ids)
    eos = is_eos.any(-1)
    first_eos = torch.where(eos, is_eos.long().argmax(-1), response.shape[1])
    positions = torch.arange(response.shape[1], device=output_ids.device)
    kept = positions[None] <= first_eos[:, None]
    output_ids = output_ids.clone()
    output_ids[:, prompt_len:].masked_fill_(~kept, pad_token_id)

    prompt_mask = prompt_mask.repeat_interleave(n_samples, dim=0).to(output_ids.device)
    response_mask = torch.cat([torch.zeros_like(prompt_mask, dtype=torch.bool), kept], dim=1)
    attention_mask = torch.cat([prompt_mask.long(), kept.long()], dim=1)
    rows = output_ids.shape[0]
    rollout_logprobs = None
    if response_logprobs is not None:
        rollout_logprobs = torch.zeros(output_ids.shape, dtype=torch.float32, device=output_ids.device)
        rollout_logprobs[:, prompt_len:] = response_logprobs.to(rollout_logprobs) * kept
    return RolloutOutput(
        input_ids=output_ids,
        attention_mask=attention_mask,
        response_start_idx=torch.full((rows,), prompt_len, dtype=torch.long, device=output_ids.device),
        response_mask=response_mask,
        eos=eos,
        truncated=~eos,
        prompt_index=torch.arange(rows, device=output_ids.device) // n_samples,
        rollout_logprobs=rollout_logprobs,
    )


def concat_rollouts(outputs: list[RolloutOutput], pad_token_id: int) -> RolloutOutput:
    """The rows of several outputs in one, prompts left-padded to the widest and responses right-padded to the
    longest (each output's rows share one prompt width, its `response_start_idx`)."""
    if len(outputs) == 1:
        return outputs[0]
    starts = [int(o.response_start_idx[0]) for o in outputs]
    prompt_width = max(starts)
    width = prompt_width + max(o.input_ids.shape[1] - s for o, s in zip(outputs, starts))

    def stacked(name: str, value) -> torch.Tensor:
        parts = []
        for o, s in zip(outputs, starts):
            tensor = getattr(o, name)
            left = prompt_width - s
            parts.append(torch.nn.functional.pad(tensor, (left, width - left - tensor.shape[1]), value=value))
        return torch.cat(parts)

    offsets = [0]
    for o in outputs[:-1]:
        offsets.append(offsets[-1] + int(o.prompt_index.max()) + 1)
    rows = sum(o.input_ids.shape[0] for o in outputs)
    return RolloutOutput(
        input_ids=stacked("input_ids", pad_token_id),
        attention_mask=stacked("attention_mask", 0),
        response_start_idx=torch.full((rows,), prompt_width, dtype=torch.long, device=outputs[0].input_ids.device),
        response_mask=stacked("response_mask", False),
        eos=torch.cat([o.eos for o in outputs]),
        truncated=torch.cat([o.truncated for o in outputs]),
        prompt_index=torch.cat([o.prompt_index + k for o, k in zip(outputs, offsets)]),
        rollout_logprobs=None if outputs[0].rollout_logprobs is None else stacked("rollout_logprobs", 0.0),
    )
