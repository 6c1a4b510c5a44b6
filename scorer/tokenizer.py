"""LLaMA's SentencePiece tokenizer with the reference's image splicing.

The reference tokenised with the slow (SentencePiece) LLaMA tokenizer; the fast conversion in transformers 5
tokenises a leading space differently (" ASSISTANT" loses its lone 29871), which shifts every prompt. So the
prompt goes through SentencePiece itself, exactly as the reference's `tokenizer_image_token` did.
"""

from __future__ import annotations

from pathlib import Path

import sentencepiece

from .modeling_mplug_owl2 import IMAGE_TOKEN_INDEX

IMAGE_PLACEHOLDER = "<|image|>"


class PromptTokenizer:
    def __init__(self, model_file: str | Path):
        self.sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
        self.model_file = Path(model_file)
        self.bos_token_id = self.sp.bos_id()
        self.eos_token_id = self.sp.eos_id()
        self.unk_token_id = self.sp.unk_id()

    def __len__(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        return ([self.bos_token_id] if add_bos else []) + (self.sp.encode(text) if text else [])

    def encode_with_images(self, prompt: str) -> list[int]:
        """BOS, then each piece between `<|image|>` markers tokenised on its own, `IMAGE_TOKEN_INDEX` between."""
        ids = [self.bos_token_id]
        for i, piece in enumerate(prompt.split(IMAGE_PLACEHOLDER)):
            if i:
                ids.append(IMAGE_TOKEN_INDEX)
            ids.extend(self.encode(piece))
        return ids

    def word_token_id(self, word: str) -> int:
        """The first token of `word` at the start of a text (how the reference picks the level-word ids)."""
        return self.encode(word)[0]

    def decode(self, ids) -> str:
        return self.sp.decode([int(i) for i in ids if 0 <= int(i) < len(self)])
