"""What the encoders, the grounding loss and the layout map call of a transformers fast
tokenizer, over a `tokenizers` Tokenizer: importing the `tokenizers` library takes 0.03 s,
transformers' tokenizer classes about 1 s."""
from __future__ import annotations

import json
from pathlib import Path


def special_tokens(folder: Path) -> dict[str, str]:
    """"cls_token", "pad_token", ... -> token, from a transformers tokenizer folder's JSON files."""
    out = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        f = Path(folder) / name
        if f.is_file():
            for k, v in json.loads(f.read_text()).items():
                if k.endswith("_token") and v is not None:
                    out[k] = v["content"] if isinstance(v, dict) else v
    return out


class FastTokenizer:
    is_fast = True  # token offsets are available (the grounding loss needs them)

    def __init__(self, tok):
        self._tok = tok
        self._tok.no_truncation()  # chunking is TextEncoder's (a file's own cut and padding are off)
        self._tok.no_padding()

    def __call__(self, text: str, add_special_tokens: bool = True, truncation: bool = False,
                 return_offsets_mapping: bool = False) -> dict:
        enc = self._tok.encode(text, add_special_tokens=add_special_tokens)
        out = {"input_ids": enc.ids}
        if return_offsets_mapping:
            out["offset_mapping"] = enc.offsets
        return out

    def __len__(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def decode(self, ids) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)  # as transformers does

    def convert_ids_to_tokens(self, ids) -> list[str]:
        return [self._tok.id_to_token(i) for i in ids]

    def get_vocab(self) -> dict[str, int]:
        return self._tok.get_vocab()
