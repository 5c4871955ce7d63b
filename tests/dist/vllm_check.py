"""The vLLM rollout engine against the ZeRO-3 student it serves. Run by tests/test_vllm.py.

    deepspeed ... tests/dist/vllm_check.py MODEL_DIR OUT_DIR

Each rank writes OUT_DIR/rank{r}.json with what it measured; any failed check raises. Checked, fp32 on CPU:
- greedy samples equal transformers' generate on the same weights (a plain, unpartitioned copy);
- vLLM's log-prob of each token it sampled equals the trainer's chunked log-prob of that token (max |diff|);
- after optimizer steps, every weight in vLLM equals the ZeRO-3 student's, gathered (vLLM fuses q/k/v and
  gate/up, so its tensors are compared with the student's concatenated), also when every parameter vLLM held was
  NaN before the sync (what sleep level 2 leaves); the buffers and loose tensors level 2 relies on are recorded;
- a response that ends with EOS is flagged as such, and the RNG of the trainer is left as it was;
- vLLM is sized from the run (max_model_len = longest prompt + max_new_tokens; the KV capacity is recorded), and
  ZeRO-3's F.linear is back after vLLM's start and after each rollout session;
- the log-probs a sampled rollout carries (vLLM's processed-logprobs mode) are those of the distribution vLLM drew
  from: the model's at the sampling temperature, renormalised over the top-k when top-k is on (not the raw,
  untempered ones).
"""

import json
import logging
import sys
import time
from pathlib import Path

import torch
import torch._dynamo  # noqa: F401  before zero.Init (CPU-NOTES)
import deepspeed
import torch.distributed as dist
from deepspeed.runtime.rollout import RolloutRequest, SamplingConfig
from deepspeed.runtime.zero.linear import zero3_linear_wrap
from transformers import AutoModelForCausalLM

from rlad_ds.config.schema import RolloutConfig
from rlad_ds.ds_config import CONFIG_DIR, fill_train_config
from rlad_ds.distributed import end_process_group, init_process_group
from rlad_ds.logprobs import token_logprobs
from rlad_ds.models import load_causal_lm, load_tokenizer
from rlad_ds.rollout.hf import generation_config
from rlad_ds.rollout.output import finish_rollout
from rlad_ds.rollout.registry import RolloutContext
from rlad_ds.rollout.vllm import VLLMRollout
from rlad_ds.rollout.vllm_engine import kv_capacity

logging.basicConfig(level=logging.WARNING, format="%(message)s")
logging.getLogger("rlad_ds").setLevel(logging.INFO)  # the engine-ready line: its start time, size and KV capacity
model_dir, out_dir = map(Path, [a for a in sys.argv[1:] if not a.startswith("--local_rank")])
init_process_group(1800)
rank, world = dist.get_rank(), dist.get_world_size()
results = {"world_size": world}
tokenizer = load_tokenizer(model_dir)
config = fill_train_config(CONFIG_DIR / "zero3.json", world_size=world, micro_batch_size=2,
                           gradient_accumulation_steps=1, lr=1e-2, gradient_clipping=1.0, device="cpu",
                           persistence_threshold=0)
model = load_causal_lm(model_dir, config)
engine, *_ = deepspeed.initialize(model=model, config=config, model_parameters=model.parameters())

texts = ["ab+c=", "hello", "x"] if rank == 0 else ["12*3=", "zz"]
# Sized as a run sizes it: the longest prompt of the data (5 tokens), the most rows one call submits (3 prompts x 3
# samples), the group (3 samples) and the longest response asked for below (16 tokens).
context = RolloutContext(prompt_tokens=5, rows_per_call=9, group_rows=3)
torch.manual_seed(1234 + rank)
before = torch.get_rng_state()
start = time.perf_counter()
rollout = VLLMRollout(engine, tokenizer, model_dir, RolloutConfig(vllm_kv_cache_gb=0.25, max_new_tokens=16), seed=0,
                      context=context)
results["startup_seconds"] = round(time.perf_counter() - start, 2)
assert torch.equal(torch.get_rng_state(), before), "starting vLLM changed the trainer's RNG"
assert all(p.data.numel() == 0 for p in engine.module.parameters()), "weights stayed gathered"
vllm_config = rollout.llm.llm_engine.vllm_config
results.update(max_model_len=vllm_config.model_config.max_model_len, kv_cache_tokens=kv_capacity(rollout.llm).tokens,
               kv_cache_rows=kv_capacity(rollout.llm).rows,
               max_num_seqs=vllm_config.scheduler_config.max_num_seqs,
               max_num_batched_tokens=vllm_config.scheduler_config.max_num_batched_tokens)
assert results["max_model_len"] == 5 + 16, results
assert torch.nn.functional.linear is zero3_linear_wrap, "ZeRO-3's F.linear did not come back after vLLM's start"
tokenizer.padding_side = "left"
enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
request = RolloutRequest(enc.input_ids, enc.attention_mask)


def gathered_state() -> dict:
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        return {name: p.detach().clone() for name, p in engine.module.named_parameters()}


def vllm_state() -> dict:
    """vLLM's weights. On CPU vLLM repacks each linear weight for its GEMM kernel (oneDNN) and empties the
    parameter; the kernel's own weight is read back as the layer applied to an identity matrix (exact in fp32)."""
    def read(model):
        state = {n: p.detach().clone() for n, p in model.named_parameters() if p.numel()}
        for name, module in model.named_modules():
            if hasattr(module, "cpu_linear") and module.weight.numel() == 0:
                eye = torch.eye(module.input_size, dtype=torch.float32)
                state[f"{name}.weight"] = module.cpu_linear(eye, module.weight, None).t().contiguous()
        return state

    return rollout.llm.apply_model(read)[0]


def check_weights(tag: str) -> None:
    """Every vLLM tensor equals the student's (fused ones equal the student's concatenated)."""
    hf, ours = gathered_state(), vllm_state()
    fused = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
    worst = 0.0
    for name, tensor in ours.items():
        module, _, leaf = name.rpartition(".")
        parent, _, kind = module.rpartition(".")
        parts = [f"{parent}.{p}.{leaf}" for p in fused[kind]] if kind in fused else [name]
        expected = torch.cat([hf.pop(p) for p in parts])
        tensor = tensor[:expected.shape[0]]  # vLLM pads the vocabulary rows of embeddings and lm_head
        assert expected.shape == tensor.shape, (name, expected.shape, tensor.shape)
        worst = max(worst, (expected - tensor).abs().max().item())
    assert not hf, f"student weights vLLM does not hold: {sorted(hf)}"
    results[f"weights_max_abs_diff_{tag}"] = worst
    assert worst == 0.0, (tag, worst)


def check_logprobs(tag: str) -> None:
    """vLLM's log-prob of each sampled token against the trainer's chunked log-probs of the same tokens."""
    sampling = SamplingConfig(max_new_tokens=12, temperature=1.0, n_samples_per_prompt=2)
    outputs = rollout.generate_raw(request, rollout.sampling_params(sampling, logprobs=0))
    rows, theirs = [], []
    for out in outputs:
        for sample in out.outputs:
            rows.append((len(out.prompt_token_ids), list(out.prompt_token_ids) + list(sample.token_ids)))
            theirs.append(torch.tensor([entry[t].logprob for entry, t in zip(sample.logprobs, sample.token_ids)]))
    # One forward for all rows (right-padded): ZeRO-3 forwards are collectives, so every rank makes one.
    width = max(len(ids) for _, ids in rows)
    ids = torch.tensor([seq + [tokenizer.pad_token_id] * (width - len(seq)) for _, seq in rows])
    mask = torch.tensor([[1] * len(seq) + [0] * (width - len(seq)) for _, seq in rows])
    with torch.no_grad():
        ours = token_logprobs(engine, ids, mask, chunk_size=3).logprobs
    worst = max((ours[i, start - 1:start - 1 + len(t)] - t).abs().max().item()
                for i, ((start, _), t) in enumerate(zip(rows, theirs)))
    count = sum(len(t) for t in theirs)
    results[f"logprob_max_abs_diff_{tag}"], results[f"logprob_tokens_{tag}"] = worst, count
    assert worst < 1e-4, (tag, worst)


# --- greedy: vLLM == transformers' generate on the same weights -------------------------------------------
greedy = SamplingConfig(max_new_tokens=16, temperature=0.0, n_samples_per_prompt=2)
batch = rollout.generate(request, greedy)
results["first_sync_seconds"] = round(rollout.sync_seconds, 3)
plain = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
with torch.no_grad():
    reference = plain.generate(request.prompt_ids.repeat_interleave(2, 0),
                               attention_mask=request.prompt_attention_mask.repeat_interleave(2, 0),
                               generation_config=generation_config(greedy, tokenizer))
expected = finish_rollout(request.prompt_attention_mask, reference, 2, tokenizer.eos_token_id, tokenizer.pad_token_id)
assert torch.equal(batch.input_ids, expected.input_ids), (batch.input_ids, expected.input_ids)
for field in ("attention_mask", "response_mask", "eos", "truncated", "prompt_index", "response_start_idx"):
    assert torch.equal(getattr(batch, field), getattr(expected, field)), field
results["greedy_equal_hf"] = True

check_weights("step0")
check_logprobs("step0")


def check_sampler_logprobs(temperature: float, top_k: int) -> None:
    """A sampled rollout's `rollout_logprobs` against log_softmax(logits / T) of the plain model on each row's real
    tokens, restricted to the top-k logits and renormalised when top-k is on."""
    sampling = SamplingConfig(max_new_tokens=12, temperature=temperature, top_k=top_k, n_samples_per_prompt=2)
    torch.manual_seed(11)
    batch = rollout.generate(request, sampling)
    worst = raw_gap = 0.0
    for ids, mask, response, theirs in zip(batch.input_ids, batch.attention_mask, batch.response_mask,
                                           batch.rollout_logprobs):
        real = mask.bool()
        with torch.no_grad():
            logits = plain(ids[real][None]).logits[0, :-1].float()
        targets = ids[real][1:]
        scaled = logits / temperature
        if top_k > 0:
            scaled = scaled.masked_fill(scaled < scaled.topk(top_k, -1).values[:, -1:], float("-inf"))
        expected = scaled.log_softmax(-1).gather(-1, targets[:, None])[:, 0]
        untempered = logits.log_softmax(-1).gather(-1, targets[:, None])[:, 0]
        sampled = response[real][1:]
        worst = max(worst, (expected[sampled] - theirs[real][1:][sampled]).abs().max().item())
        raw_gap = max(raw_gap, (untempered[sampled] - theirs[real][1:][sampled]).abs().max().item())
    tag = f"T{temperature}_top{top_k}"
    results[f"sampler_logprob_max_abs_diff_{tag}"], results[f"raw_logprob_gap_{tag}"] = worst, raw_gap
    assert worst < 1e-4 < raw_gap, (tag, worst, raw_gap)


check_sampler_logprobs(0.7, 0)
check_sampler_logprobs(0.7, 5)

# --- train: after N optimizer steps vLLM holds the new weights ------------------------------------------
ids = torch.randint(3, len(tokenizer), (2, 10), generator=torch.Generator().manual_seed(rank))
for step in range(2):
    loss = engine(input_ids=ids, labels=ids).loss
    engine.backward(loss)
    engine.step()


def drop_weights_as_sleep_level_2_does(model):
    """What sleep level 2 leaves of vLLM's weights on CUDA: memory with no meaning. Every parameter vLLM holds as a
    tensor becomes NaN (on CPU its linear layers keep their weights in their GEMM kernel's packing, rebuilt by every
    reload); its buffers are left, as vLLM's worker copies them to host memory and back across level 2. Returns
    the buffers and the tensors the model holds outside parameters and buffers, which level 2 would lose."""
    for param in model.parameters():
        param.data.fill_(float("nan"))
    owned = {id(t) for t in [*model.parameters(), *model.buffers()]}
    loose = [f"{name}.{attr}" for name, module in model.named_modules() for attr, value in vars(module).items()
             if isinstance(value, torch.Tensor) and id(value) not in owned]
    return [name for name, _ in model.named_buffers()], loose


# The next sync must restore every weight from nothing, as it does after a wake from sleep level 2.
results["vllm_buffers"], results["vllm_loose_tensors"] = rollout.llm.apply_model(drop_weights_as_sleep_level_2_does)[0]
rollout.sync_weights(2)
results["sync_seconds"] = round(rollout.sync_seconds, 3)
check_weights("step2")
check_logprobs("step2")
rollout.sync_weights(2)  # no optimizer step since: nothing to do
assert rollout.synced_step == engine.global_steps == 2
assert torch.nn.functional.linear is zero3_linear_wrap, "ZeRO-3's F.linear did not come back after a session"

# --- sampled rows: seeded by torch's generator, different per rank, EOS flagged ------------------------
sampling = SamplingConfig(max_new_tokens=8, temperature=1.0, top_p=0.9, top_k=20, n_samples_per_prompt=3)
torch.manual_seed(7)
first = rollout.generate(request, sampling)
torch.manual_seed(7)
again = rollout.generate(request, sampling)
assert torch.equal(first.input_ids, again.input_ids), "same torch seed, different vLLM samples"
assert first.prompt_index.tolist() == [i // 3 for i in range(3 * len(texts))]
assert len({tuple(r.tolist()) for r in first.input_ids}) > len(texts), "n samples per prompt are all equal"
results["sampled_rows"] = first.input_ids.tolist()
# A large EOS row in lm_head: EOS becomes the argmax wherever the hidden state points its way (most rows).
lm_head = engine.module.get_output_embeddings().weight
with deepspeed.zero.GatheredParameters([lm_head], modifier_rank=0):
    if rank == 0:
        lm_head.data[tokenizer.eos_token_id] = 50 * lm_head.data.abs().max()
rollout.synced_step = None  # weights changed outside an optimizer step: force the next sync
eos_batch = rollout.generate(request, greedy)
assert eos_batch.eos.any(), "no response ended with EOS"
for ids, mask, eos, truncated in zip(eos_batch.input_ids, eos_batch.response_mask, eos_batch.eos, eos_batch.truncated):
    response = ids[mask]
    assert bool(truncated) == (not eos)
    if eos:  # stops at its first EOS, which is kept
        assert response[-1] == tokenizer.eos_token_id and (response[:-1] != tokenizer.eos_token_id).all()
    else:
        assert len(response) == greedy.max_new_tokens and (response != tokenizer.eos_token_id).all()
results["eos_rows"] = eos_batch.eos.tolist()

out_dir.mkdir(parents=True, exist_ok=True)
(out_dir / f"rank{rank}.json").write_text(json.dumps(results, indent=1))
print(f"rank {rank}: {json.dumps({k: v for k, v in results.items() if k != 'sampled_rows'})}", flush=True)
end_process_group()  # as the entry points end: vLLM's engine is torn down before the process group
