"""Chunked log-probs against naive full-logit log-probs (value and gradient), packing, micro-batching."""

import pytest
import torch

from rlad_ds.logprobs import chunked_token_logprobs, token_logprobs
from rlad_ds.microbatches import pack_rows, synced_microbatch_count, token_budget_microbatches, unpack_logprobs


def naive(hidden, weight, targets, temperature=1.0):
    log_probs = torch.log_softmax((hidden @ weight.t()).float() / temperature, dim=-1)
    logp = log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    return logp, entropy


@pytest.mark.parametrize("chunk_size", [1, 5, 64])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_matches_naive_value_and_gradient(chunk_size, temperature):
    torch.manual_seed(0)
    hidden = torch.randn(3, 7, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 50, (3, 7))
    coef_logp, coef_entropy = torch.randn(3, 7, dtype=torch.float64), torch.randn(3, 7, dtype=torch.float64)

    logp, entropy = chunked_token_logprobs(
        hidden, weight, targets, chunk_size=chunk_size, temperature=temperature, with_entropy=True
    )
    grads = torch.autograd.grad((logp * coef_logp).sum() + (entropy * coef_entropy).sum(), [hidden, weight])
    ref_logp, ref_entropy = naive(hidden, weight, targets, temperature)
    ref_grads = torch.autograd.grad((ref_logp * coef_logp).sum() + (ref_entropy * coef_entropy).sum(), [hidden, weight])

    # Forward returns fp32 (the log-sum-exp is fp32); gradients are in the inputs' dtype.
    torch.testing.assert_close(logp, ref_logp.float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(entropy, ref_entropy.float(), atol=1e-5, rtol=1e-5)
    for grad, ref in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref, atol=1e-5, rtol=1e-4)


def test_frozen_weight_gets_no_gradient():
    hidden = torch.randn(4, 8, requires_grad=True)
    weight = torch.randn(11, 8)
    logp, entropy = chunked_token_logprobs(hidden, weight, torch.randint(0, 11, (4,)), chunk_size=3)
    assert entropy is None
    logp.sum().backward()
    assert hidden.grad is not None and weight.grad is None


@pytest.fixture(scope="module")
def tied_and_untied(tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    from rlad_ds.tiny import tiny_config

    models = {}
    for tie in (False, True):
        torch.manual_seed(0)
        config = tiny_config("qwen3", len(tiny_tokenizer), hidden=32, layers=2, tie_embeddings=tie)
        config._attn_implementation = "sdpa"
        models[tie] = AutoModelForCausalLM.from_config(config).float()
    return models


@pytest.mark.parametrize("tie", [False, True])
def test_model_logprobs_match_full_logits(tied_and_untied, tie):
    model = tied_and_untied[tie]
    torch.manual_seed(2)
    input_ids = torch.randint(3, 90, (3, 12))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :4] = 0  # left-padded prompt
    attention_mask[2, 9:] = 0  # right-padded response

    model.zero_grad()
    out = token_logprobs(model, input_ids, attention_mask, chunk_size=5, with_entropy=True, temperature=0.9)
    (out.logprobs.sum() + 0.3 * out.entropy.sum()).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}

    model.zero_grad()
    from rlad_ds.logprobs import positions_from_mask

    logits = (
        model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions_from_mask(attention_mask))
        .logits[:, :-1]
        .float()
        / 0.9
    )
    log_probs = logits.log_softmax(-1)
    ref_logp = log_probs.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    ref_entropy = -(log_probs.exp() * log_probs).sum(-1)
    (ref_logp.sum() + 0.3 * ref_entropy.sum()).backward()

    torch.testing.assert_close(out.logprobs, ref_logp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.entropy, ref_entropy, atol=1e-5, rtol=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, atol=1e-5, rtol=1e-4, msg=name)
    assert not hasattr(model.get_output_embeddings(), "forward") or "forward" not in vars(model.get_output_embeddings())


def test_packed_rows_equal_padded_logprobs(tied_and_untied):
    model = tied_and_untied[False]
    torch.manual_seed(3)
    input_ids = torch.randint(3, 90, (3, 10))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :3] = 0
    attention_mask[1, 7:] = 0
    attention_mask[2, :2] = 0
    attention_mask[2, 8:] = 0
    packed = pack_rows(input_ids, attention_mask)
    assert packed.spans == [(3, 7), (0, 7), (2, 6)]
    assert packed.position_ids.tolist() == [list(range(7)) + list(range(7)) + list(range(6))]

    with torch.no_grad():
        padded = token_logprobs(model, input_ids, attention_mask).logprobs
        flat = token_logprobs(model, packed.input_ids, position_ids=packed.position_ids).logprobs
    unpacked = unpack_logprobs(flat, packed)
    valid = (attention_mask[:, :-1] * attention_mask[:, 1:]).bool()
    torch.testing.assert_close(unpacked[valid], padded[valid], atol=1e-5, rtol=1e-5)
    assert (unpacked[~valid] == 0).all()


def test_pack_rows_refuses_holes():
    with pytest.raises(ValueError, match="contiguous"):
        pack_rows(torch.arange(4)[None], torch.tensor([[1, 0, 1, 1]]))


def test_token_budget_microbatches():
    lengths = [5, 9, 2, 9, 3, 20]
    padded = token_budget_microbatches(lengths, max_tokens=18)
    assert sorted(i for batch in padded for i in batch) == list(range(6))
    assert padded[0] == [5]  # longer than the budget: alone
    for batch in padded:
        assert len(batch) == 1 or len(batch) * max(lengths[i] for i in batch) <= 18
    packed = token_budget_microbatches(lengths, max_tokens=18, padded=False)
    for batch in packed:
        assert len(batch) == 1 or sum(lengths[i] for i in batch) <= 18
    assert len(packed) <= len(padded)
    with pytest.raises(ValueError):
        token_budget_microbatches(lengths, 0)


def test_synced_count_without_process_group():
    assert synced_microbatch_count(3) == 3


def test_packed_microbatch_equals_padded_in_value_and_gradient(tied_and_untied):
    from rlad_ds.microbatches import microbatch_logprobs

    model = tied_and_untied[True]
    torch.manual_seed(4)
    input_ids = torch.randint(3, 90, (3, 9))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :2] = 0  # a left-padded prompt
    attention_mask[1, 6:] = 0  # a response that stopped early
    valid = (attention_mask[:, :-1] * attention_mask[:, 1:]).bool()
    results = {}
    for packed in (False, True):
        model.zero_grad()
        out = microbatch_logprobs(model, input_ids, attention_mask, packed=packed, with_entropy=True)
        (out.logprobs[valid].sum() + 0.1 * out.entropy[valid].sum()).backward()
        results[packed] = (out.logprobs[valid].detach(), [p.grad.clone() for p in model.parameters()])
    torch.testing.assert_close(results[True][0], results[False][0], atol=1e-5, rtol=1e-5)
    for packed_grad, padded_grad in zip(results[True][1], results[False][1]):
        torch.testing.assert_close(packed_grad, padded_grad, atol=1e-5, rtol=1e-4)


def test_bf16_inputs_give_fp32_logprobs_and_bf16_gradients():
    """The precision GPU users train in: bf16 hidden states and lm-head, fp32 log-probs (what the loss sees),
    close to an fp32 computation from the same bf16 logits; gradients come back in bf16 for the bf16 weights."""
    torch.manual_seed(0)
    hidden = torch.randn(2, 9, 32).bfloat16().requires_grad_()
    weight = torch.randn(300, 32).bfloat16().requires_grad_()
    targets = torch.randint(0, 300, (2, 9))
    logp, _ = chunked_token_logprobs(hidden, weight, targets, chunk_size=4)
    assert logp.dtype == torch.float32
    ref, _ = naive(hidden.detach(), weight.detach(), targets)
    torch.testing.assert_close(logp, ref, atol=0.1, rtol=0.02)  # bf16 logits: ~3 significant digits
    logp.sum().backward()
    assert hidden.grad.dtype == torch.bfloat16 and weight.grad.dtype == torch.bfloat16
    assert torch.isfinite(hidden.grad.float()).all() and torch.isfinite(weight.grad.float()).all()
