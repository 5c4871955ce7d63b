"""The embedded demo's assets: a local tokenizer and an SFT-trained teacher and student for `arith`.

`prepare_demo(cache_dir)` returns HF model dirs ``{"student": Path, "teacher": Path}`` for the
column-wise addition task (`rlad_ds.tasks.arith`): a Qwen3 teacher of ~2.4M parameters and a Qwen3
student of ~80k parameters, both pre-trained by supervised fine-tuning on generated worked solutions
(plain PyTorch, one process, no DeepSpeed). The SFT lengths are chosen so that the teacher is nearly
perfect and the student only partly competent, which leaves room for RL to improve it.

Prompt format (explicit choice): the demo uses a *raw* template, not ChatML. The tokenizer's vocabulary
is the 14 characters of the task plus the specials <|pad|>, <|im_start|>, <|im_end|> (17 tokens), and its
chat template renders a user message as its bare content and adds nothing for the generation prompt, so
``apply_chat_template([{"role": "user", "content": "347+285="}], add_generation_prompt=True)`` is
``347+285=``; the model continues with the worked solution and ends with EOS ``<|im_end|>``. Code that
applies chat templates therefore needs no special case for the demo. (ChatML would need role names and
newlines in the vocabulary, i.e. a larger vocabulary for nothing.)

Modules: `recipe` (tokenizer, model sizes, SFT schedules, the RL profile), `sft` (the SFT loop and accuracy
through the one generation path), `cache` (build once, reuse: `prepare_demo`), `summary` (the run's verdict, a
callback).
"""
