"""Hugging Face MoE checkpoint -> GGUF converter (`python convert/to_gguf.py --help`).

`convert.to_gguf.convert` is the entry point for code; `convert/archs/` holds one small
module per architecture (tensor map + metadata), `convert/checkpoint.py` reads the
checkpoint, `convert/qtypes.py` decides and applies each tensor's GGUF type, and
`convert/tokenizer_meta.py` embeds the tokenizer.
"""
