"""A GGUF's tokenizer as the files edgekit's runtime reads: tokenizer.json and tokenizer_config.json
(with the chat template), converted by transformers' GGUF tokenizer support at export time.
"""

from __future__ import annotations

import json
from pathlib import Path

from edgekit.checkpoint.gguf import metadata_field, one_line, open_reader
from edgekit.errors import EdgekitError

# tokenizer_config.json keys transformers 5 records about how *this* load happened, not about the tokenizer.
_LOAD_ONLY_KEYS = ("is_local", "local_files_only")


def write_tokenizer(path: Path, out_dir: Path) -> list[str]:
    """Write tokenizer.json and tokenizer_config.json (with chat_template) for a GGUF; return the file names."""
    path = Path(path)
    out_dir = Path(out_dir)
    reader = open_reader(path)
    if reader.get_field("tokenizer.ggml.model") is None:
        raise EdgekitError(f"{path.name} has no tokenizer metadata (tokenizer.ggml.model)")
    chat_template = metadata_field(reader, "tokenizer.chat_template")
    del reader

    # transformers' GGUF tokenizer conversion (GGUFTokenizerSkeleton + converters) is the maintained
    # mapping from llama.cpp's vocab/merges/token types/pre-tokenizer to a tokenizers pipeline.
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as exc:
        raise EdgekitError(f"cannot convert the tokenizer of {path.name}: {one_line(exc)}") from None
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [Path(p).name for p in tokenizer.save_pretrained(str(out_dir))]

    # transformers 5 moves the template to chat_template.jinja; a torch-free runtime reads
    # tokenizer_config.json only, so put it back there as well.
    config_path = out_dir / "tokenizer_config.json"
    tok_config = json.loads(config_path.read_text(encoding="utf-8"))
    for key in _LOAD_ONLY_KEYS:
        tok_config.pop(key, None)
    template = chat_template if chat_template is not None else tokenizer.chat_template
    if isinstance(template, str):
        tok_config["chat_template"] = template
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        value = getattr(tokenizer, key, None)
        if isinstance(value, str):
            tok_config[key] = value
    config_path.write_text(json.dumps(tok_config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    if "tokenizer.json" not in written:
        raise EdgekitError(f"the tokenizer of {path.name} has no fast (tokenizer.json) form")
    return sorted(written)
