"""The shipped CLIP vocabulary tokenizes as OpenAI's CLIP (and openai/clip-vit-large-patch14)."""
import gzip
import json

import regex
import torch

from mezzotint.config import TextConfig
from mezzotint.sd.tokenizer import BPE_FILE, clip_tokenizer, save_tokenizer

PROMPTS = [
    "a photo of a cat", "A PHOTO of a Cat!!", "an astronaut riding a horse on mars, 4k, trending on artstation",
    "  spaces\tand\nnewlines  ", "(masterpiece:1.2), [blurry], {curly} <tags> don't we'll it's", "1234567 3.14159",
    "café naïve façade — “quotes” 東京 🐈", "", "supercalifragilisticexpialidocious antidisestablishmentarianism",
]


class OpenAIBPE:
    """OpenAI CLIP's SimpleTokenizer algorithm, written out here as the reference
    (without its ftfy / html cleaning, which transformers' tokenizer does not do either)."""

    def __init__(self):
        from transformers.convert_slow_tokenizer import bytes_to_unicode
        self.byte_encoder = bytes_to_unicode()
        lines = gzip.open(BPE_FILE).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
        merges = [tuple(line.split()) for line in lines]
        vocab = list(self.byte_encoder.values())
        vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges]
        vocab += ["<|startoftext|>", "<|endoftext|>"]
        self.encoder = {v: i for i, v in enumerate(vocab)}
        self.merges = merges
        self.ranks = {m: i for i, m in enumerate(merges)}
        self.pat = regex.compile(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|"""
                                 r"""[^\s\p{L}\p{N}]+""", regex.IGNORECASE)

    def bpe(self, token):
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        while len(word) > 1:
            pairs = {(a, b) for a, b in zip(word, word[1:])}
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            out, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            word = tuple(out)
        return word

    def encode(self, text):
        text = " ".join(text.split()).strip().lower()
        ids = []
        for token in self.pat.findall(text):
            token = "".join(self.byte_encoder[b] for b in token.encode("utf-8"))
            ids += [self.encoder[t] for t in self.bpe(token)]
        return ids


def test_known_ids_and_padding():
    tok = clip_tokenizer()
    assert tok("a photo of a cat")["input_ids"] == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert len(tok) == 49408 and tok.model_max_length == 77
    assert tok.bos_token_id == 49406 and tok.eos_token_id == 49407 and tok.pad_token_id == 49407
    sd2 = clip_tokenizer("!")  # diffusers' SD 2 tokenizer pads with "!", id 0, as OpenCLIP does
    assert sd2.pad_token_id == 0 and sd2("a cat")["input_ids"] == [49406, 320, 2368, 49407]


def test_matches_openai_algorithm_and_transformers_from_files(tmp_path):
    from transformers import CLIPTokenizer
    ref = OpenAIBPE()
    # vocab.json / merges.txt as Hugging Face ships them for openai/clip-vit-large-patch14
    (tmp_path / "vocab.json").write_text(json.dumps(ref.encoder))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in ref.merges) + "\n")
    hf = CLIPTokenizer.from_pretrained(tmp_path)
    ours = clip_tokenizer()
    for p in PROMPTS:
        want = ref.encode(p)
        assert ours(p, add_special_tokens=False)["input_ids"] == want, p
        assert hf(p)["input_ids"] == ours(p)["input_ids"] == [49406] + want + [49407], p


def test_saved_tokenizer_reloads_with_its_padding(tmp_path):
    from transformers import CLIPTokenizer
    save_tokenizer(clip_tokenizer("!"), tmp_path / "tok")
    assert (tmp_path / "tok" / "vocab.json").is_file() and (tmp_path / "tok" / "merges.txt").is_file()
    again = CLIPTokenizer.from_pretrained(tmp_path / "tok")
    assert again.pad_token_id == 0 and again("a photo of a cat")["input_ids"][5] == 2368


def test_text_encoder_chunks_with_sd_tokenizer():
    from transformers import CLIPTextConfig, CLIPTextModel

    from mezzotint.text import TextEncoder
    torch.manual_seed(0)
    model = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=1, bos_token_id=49406, eos_token_id=49407))
    enc = TextEncoder(TextConfig(kind="clip", path="text_encoder"), clip_tokenizer("!"), model)
    chunks = enc.tokenize("a cat " * 50)  # 100 tokens -> two 75-token chunks
    assert [len(c) for c in chunks] == [77, 27] and chunks[0][0] == 49406 and chunks[0][-1] == 49407
    emb, mask = enc.encode(["a cat " * 50])
    assert emb.shape == (1, 154, 32) and mask.all()
