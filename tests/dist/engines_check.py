"""Student and teacher engines under ZeRO-3, checked against plain HF models. Run by tests/test_engines.py.

    python tests/dist/engines_check.py STUDENT_DIR TIED_STUDENT_DIR TEACHER_DIR OUT_DIR     (1 process, env set)
    deepspeed ... tests/dist/engines_check.py STUDENT_DIR TIED_STUDENT_DIR TEACHER_DIR OUT_DIR

Each rank writes OUT_DIR/rank{r}.json with what it measured; any failed check raises.
"""

import json
import time
import logging
import sys
from pathlib import Path

import torch
import torch._dynamo  # noqa: F401  before zero.Init (CPU-NOTES)
import deepspeed
import torch.distributed as dist
from transformers import AutoModelForCausalLM

from rlad_ds.ds_config import CONFIG_DIR, fill_train_config, inference_config
from rlad_ds.logprobs import positions_from_mask, token_logprobs
from rlad_ds.models import load_causal_lm, load_tokenizer
from rlad_ds.config.schema import RolloutConfig
from rlad_ds.errors import ConfigError
from rlad_ds.logprob_scorer import LogProbScorer
from rlad_ds.rollout.hf import (
    GatheredRollout,
    PerLayerRollout,
    _parameter_offload,
    gathered_for_generation,
    generation_config,
)
from rlad_ds.rollout.hybrid import HybridRollout
from rlad_ds.rollout.output import finish_rollout
from rlad_ds.rollout.registry import choose_rollout
from rlad_ds.run_models import load_frozen
from deepspeed.runtime.rollout import RolloutRequest, SamplingConfig
from rlad_ds.distributed import init_process_group

# The launcher adds --local_rank=N in front of the script's own arguments.
student_dir, tied_dir, teacher_dir, out_dir = map(Path, [a for a in sys.argv[1:] if not a.startswith("--local_rank")])
init_process_group(1800)  # (not deepspeed.init_distributed: this removes the /dev/shm buffer at exit)
rank, world = dist.get_rank(), dist.get_world_size()
results = {"world_size": world}
clock = time.perf_counter()


def lap(name):
    global clock
    results[f"seconds_{name}"] = round(time.perf_counter() - clock, 2)
    clock = time.perf_counter()


logging.basicConfig(level=logging.INFO, format=f"[rank{rank}] %(name)s: %(message)s")


def student_engine(path, gradient_checkpointing=False):
    config = fill_train_config(
        CONFIG_DIR / "zero3.json",
        world_size=world,
        micro_batch_size=2,
        gradient_accumulation_steps=1,
        lr=1e-2,
        gradient_clipping=1.0,
        device="cpu",
        persistence_threshold=0,
    )
    model = load_causal_lm(path, config, gradient_checkpointing=gradient_checkpointing)
    engine, *_ = deepspeed.initialize(model=model, config=config, model_parameters=model.parameters())
    return engine


def plain(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa").eval()


def full_params(engine):
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        return {name: p.detach().clone() for name, p in engine.module.named_parameters()}


tokenizer = load_tokenizer(student_dir)
engine = student_engine(student_dir)
reference = plain(student_dir)

lap("load")
# --- partitioned: every rank holds about 1/world of every parameter, and no whole one -----------------
full = sum(p.ds_numel for p in engine.module.parameters())
local = sum(p.ds_tensor.numel() for p in engine.module.parameters())
results["partition_fraction"] = local / full
assert abs(local / full - 1 / world) < 0.05, results
assert all(p.data.numel() == 0 for p in engine.module.parameters()), "a parameter is held whole"

# --- prompts differ per rank, left-padded --------------------------------------------------------------
texts = ["ab", "c", "dab", "b"] if rank == 0 else ["cc", "a"]
tokenizer.padding_side = "left"
prompt = tokenizer(texts, return_tensors="pt", padding=True)
request = RolloutRequest(prompt.input_ids, prompt.attention_mask)
# Unequal lengths across ranks: different budgets, and a 6-token vocabulary makes EOS frequent.
sampling = SamplingConfig(
    max_new_tokens=3 if rank == 0 else 30, temperature=1.0, top_p=0.95, top_k=0, n_samples_per_prompt=2
)


def plain_rollout(seed):
    torch.manual_seed(seed)
    ids = request.prompt_ids.repeat_interleave(2, 0)
    mask = request.prompt_attention_mask.repeat_interleave(2, 0)
    with torch.no_grad():
        out = reference.generate(ids, attention_mask=mask, generation_config=generation_config(sampling, tokenizer))
    return finish_rollout(request.prompt_attention_mask, out, 2, tokenizer.eos_token_id, tokenizer.pad_token_id)


def built(requested: str, **rollout_cfg):
    """What --rollout REQUESTED builds for this engine's model on CPU."""
    cfg = RolloutConfig(**rollout_cfg)
    return choose_rollout(requested, engine.module, "cpu", cfg).from_run(engine, tokenizer, None, cfg, 0)


rollouts = {}
# auto: vLLM cannot run head_dim 8, the hybrid engine has no CPU kernels; a gather over budget gives per-layer.
for kind, rollout in (("gathered", built("auto")), ("per_layer", built("auto", gather_budget_gb=1e-9))):
    assert isinstance(rollout, GatheredRollout if kind == "gathered" else PerLayerRollout), rollout
    torch.manual_seed(100 + rank)
    batch = rollout.generate(request, sampling)
    expected = plain_rollout(100 + rank)
    assert torch.equal(batch.input_ids, expected.input_ids), (kind, batch.input_ids, expected.input_ids)
    assert torch.equal(batch.response_mask, expected.response_mask) and torch.equal(batch.eos, expected.eos)
    assert not batch.response_mask[:, : request.prompt_ids.shape[1]].any()
    rollouts[kind] = batch
    results[f"{kind}_response_lengths"] = batch.response_lengths.tolist()
    results[f"{kind}_eos"] = batch.eos.tolist()
for requested in ("hybrid_engine", "vllm"):  # asked for and unable: one line, no fallback
    try:
        built(requested)
        raise AssertionError(f"--rollout {requested} was not refused")
    except ConfigError as error:
        assert str(error).startswith(f"--rollout {requested} cannot run here: "), error
# HybridRollout's completion of DeepSpeed's batch, on a plain ZeRO-3 engine (no kernels on CPU): DeepSpeed
# decodes without EOS stops on every rank, so a greedy rollout must match the gathered one after finishing.
greedy = SamplingConfig(max_new_tokens=5, temperature=0.0, n_samples_per_prompt=2)
via_deepspeed = HybridRollout(engine, tokenizer).generate(request, greedy)
via_gather = built("gathered").generate(request, greedy)
for field in ("input_ids", "attention_mask", "response_mask", "eos", "truncated", "prompt_index"):
    assert torch.equal(getattr(via_deepspeed, field), getattr(via_gather, field)), field
batch = rollouts["gathered"]
assert torch.equal(batch.truncated, ~batch.eos)
assert (batch.response_lengths[batch.truncated] == sampling.max_new_tokens).all()
assert batch.attention_mask[:, : request.prompt_ids.shape[1]].equal(
    request.prompt_attention_mask.repeat_interleave(2, 0)
)

lap("rollouts")
# --- an exception inside the gathered section leaves the hooks on and the weights partitioned ----------
try:
    with gathered_for_generation(engine):
        raise KeyError("boom")
except KeyError:
    pass
assert _parameter_offload(engine).forward_hooks, "ZeRO-3 hooks were not restored after an exception"
assert all(p.data.numel() == 0 for p in engine.module.parameters()), "weights stayed gathered"

lap("exception")
# --- training after rollouts equals training without (fresh engine, same weights and data) -----------
train_ids = torch.randint(3, len(tokenizer), (2, 9), generator=torch.Generator().manual_seed(7 + rank))
train_mask = torch.ones_like(train_ids)
train_mask[0, :3] = 0


def train_step(e, rollout=None):
    if rollout is not None:
        rollout.generate(request, sampling)
    loss = -token_logprobs(e, train_ids, train_mask, chunk_size=4).logprobs[:, 3:].mean()
    e.backward(loss)
    e.step()
    return loss.item()


fresh = student_engine(student_dir)
gathered = GatheredRollout(engine, tokenizer)
losses_with = [train_step(engine, gathered) for _ in range(2)]
losses_without = [train_step(fresh) for _ in range(2)]
assert losses_with == losses_without, (losses_with, losses_without)
after_with, after_without = full_params(engine), full_params(fresh)
for name in after_with:
    assert torch.equal(after_with[name], after_without[name]), name
results["losses"] = losses_with
# The trainer's order on a fresh engine (a rollout, then an update of one micro-batch, step after step): the trace
# the first update records is completed when the next rollout starts, and kept from then on. (Dropped instead, it
# was recorded again by every update, which then released even persistent parameters after each use: 2x slower.)
looped = student_engine(student_dir)
looped_rollout, looped_coordinator = (
    GatheredRollout(looped, tokenizer),
    _parameter_offload(looped).get_param_coordinator(),
)


def hook_layout(e):
    """The root's forward hooks in the order they run, and the modules whose parameters ZeRO-3 watches."""
    root = e.module
    names = [
        getattr(fn, "__qualname__", "?") for fn in [*root._forward_pre_hooks.values(), *root._forward_hooks.values()]
    ]
    return names, sum(type(m._parameters).__name__ == "ZeROOrderedDict" for m in root.modules())


initial_layout = hook_layout(looped)
with gathered_for_generation(looped):  # decoding runs with no hook on the root and plain parameter dicts
    assert hook_layout(looped) == ([], 0), hook_layout(looped)
for step in range(4):
    looped_rollout.generate(request, sampling)
    assert hook_layout(looped) == initial_layout, (hook_layout(looped), initial_layout)
    assert looped_coordinator.is_complete_trace() == (step > 0), f"trace after the rollout of step {step}"
    looped.backward(-token_logprobs(looped, train_ids, train_mask).logprobs.mean())
    looped.step()
    assert looped_coordinator.is_complete_trace() == (step > 0), f"trace after the update of step {step}"
# The rollout keeps ZeRO-3's recorded fetch order (and the module ids it is keyed by): training after it prefetches.
coordinator = _parameter_offload(engine).get_param_coordinator()
train_step(engine)
assert coordinator.is_complete_trace(), "two training passes did not complete ZeRO-3's trace"
module_ids = [m.ds_id for m in engine.module.modules()]
gathered.generate(request, sampling)
assert coordinator.is_complete_trace(), "a gathered rollout discarded ZeRO-3's prefetch trace"
assert [m.ds_id for m in engine.module.modules()] == module_ids
train_step(engine)
assert coordinator.is_complete_trace(), "the training pass after a rollout did not follow the kept trace"

lap("train")
# --- chunked log-probs under ZeRO-3 (tied lm-head with gradient checkpointing, and untied): gradients equal
#     plain full-logit ones
for path in (student_dir, tied_dir):
    e = student_engine(path, gradient_checkpointing=path == tied_dir)
    model = plain(path).train()
    ids = torch.randint(3, len(tokenizer), (2, 8), generator=torch.Generator().manual_seed(11))  # same on all ranks
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    loss = -token_logprobs(e, ids, mask, chunk_size=3).logprobs.sum()
    e.backward(loss)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask)).logits[:, :-1]
    (-logits.float().log_softmax(-1).gather(-1, ids[:, 1:, None]).sum()).backward()
    names = dict(e.module.named_parameters())
    for name, p in model.named_parameters():
        grad = deepspeed.utils.safe_get_full_grad(names[name])
        torch.testing.assert_close(grad, p.grad, atol=1e-5, rtol=1e-4, msg=f"{path.name} {name}")
    results[f"grad_checked_{path.name}"] = {"params": len(names), "checkpointing": e.module.is_gradient_checkpointing}
    e.destroy()

lap("grads")
# --- teacher: ZeRO-3 inference with CPU param offload, log-probs equal a plain HF forward ---------------
frozen = load_frozen(
    teacher_dir,
    inference_config(offload=True, world_size=world, micro_batch_size=2, device="cpu", persistence_threshold=0),
)
teacher = LogProbScorer(
    frozen, tokenizer, chunk_size=5, max_tokens_per_microbatch=20 if rank == 0 else 1000
)  # unequal micro-batch counts
assert all(not p.requires_grad for p in teacher.engine.module.parameters()) and not teacher.engine.module.training
assert type(teacher.engine.optimizer).__name__ == "DeepSpeedZeRoOffload"  # hooks only, no optimizer
rows = batch if rank == 0 else rollouts["per_layer"]
teacher_plain = plain(teacher_dir)
with torch.no_grad():
    logits = teacher_plain(
        input_ids=rows.input_ids,
        attention_mask=rows.attention_mask,
        position_ids=positions_from_mask(rows.attention_mask),
    ).logits[:, :-1]
valid = (rows.attention_mask[:, :-1] * rows.attention_mask[:, 1:]).bool()
for temperature in (1.0, 0.7):  # every log-prob in the loss is of softmax(logits / T), the teacher's too
    teacher.temperature = temperature
    scored = teacher.logprobs(rows.input_ids, rows.attention_mask)
    expected = (logits.float() / temperature).log_softmax(-1).gather(-1, rows.input_ids[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(scored[valid], expected[valid], atol=1e-5, rtol=0)
    assert (scored[~rows.attention_mask[:, 1:].bool()] == 0).all()
    results[f"teacher_max_abs_err_t{temperature}"] = (scored[valid] - expected[valid]).abs().max().item()
results["teacher_max_abs_err"] = max(results["teacher_max_abs_err_t1.0"], results["teacher_max_abs_err_t0.7"])

lap("teacher")
(out_dir / f"rank{rank}.json").write_text(json.dumps(results))
dist.barrier()
dist.destroy_process_group()
