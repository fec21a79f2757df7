"""tune's runtime: a Plan in, trained LoRA adapters and reports out. Never imports Hydra."""
