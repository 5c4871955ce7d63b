"""Checkpoints: the run directory's policy (`run_dir`), the manifest that makes a checkpoint verifiable
(`manifest`), the collective save / load protocol (`protocol`) and the Hugging Face export (`export`)."""
