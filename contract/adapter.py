"""The files of a saved LoRA adapter (what peft's `save_pretrained` writes): the engine writes them into every
checkpoint and result archive, and the inference side checks an unpacked archive for them."""

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
