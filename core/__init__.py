"""What the compiler and the runtime share: the Plan and its sections, architecture facts, packing
arithmetic, errors, atomic files, labels, the token-cache reader, prompting (templates, tokenizer,
text cleaning), the retrieval index, GGUF's layout and which process this is. Imports neither
`compiler` nor `runtime`, nor JAX, Hydra or OmegaConf."""
