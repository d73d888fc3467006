"""Hugging Face interchange: the one name/transform table, safetensors files, `from_pretrained`,
`save_pretrained` and the `phi2-convert` command.
"""
