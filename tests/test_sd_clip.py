"""mezzotint's own CLIP text model and tokenizer (sd/clip.py) against transformers', and
generation without importing transformers at all."""
import json
import subprocess
import sys

import pytest
import torch

from mezzotint.sd import clip
from mezzotint.sd.tokenizer import clip_tokenizer

from test_sd_common import hf_clip_tokenizer, saved

PROMPTS = ["a photo of a cat", "A PHOTO of a Cat!!!", "  spaces\tand\nnewlines  ", "<|endoftext|> in the text",
           "(masterpiece:1.2), [blurry] don't we'll", "café naïve — “quotes” 東京 🐈", "", "1234567 3.14",
           "wow!!! !! ! end"]


@pytest.mark.parametrize("pad", ["<|endoftext|>", "!"])
def test_tokenizer_matches_transformers(pad):
    ours, ref = clip_tokenizer(pad), hf_clip_tokenizer(pad)
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == \
        (ref.bos_token_id, ref.eos_token_id, ref.pad_token_id)
    for p in PROMPTS:
        for special in (False, True):
            a = ours(p, add_special_tokens=special, return_offsets_mapping=True)
            b = ref(p, add_special_tokens=special, return_offsets_mapping=True)
            assert a["input_ids"] == b["input_ids"], p
            assert [tuple(o) for o in a["offset_mapping"]] == [tuple(o) for o in b["offset_mapping"]], p
        ids = ours(p, add_special_tokens=False)["input_ids"]
        assert ours.decode(ids) == ref.decode(ids), p
        assert ours.convert_ids_to_tokens(ids) == ref.convert_ids_to_tokens(ids), p
    assert len(ours) == len(ref) == 49408


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_model_matches_transformers(act, tmp_path):
    from transformers import CLIPTextConfig, CLIPTextModel
    torch.manual_seed(0)
    ref = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                       num_attention_heads=2, max_position_embeddings=77, hidden_act=act)).eval()
    ref.save_pretrained(tmp_path / "hf")
    from safetensors.torch import load_file
    ours = clip.from_folder(tmp_path / "hf", load_file(tmp_path / "hf" / "model.safetensors"))
    ids = torch.randint(0, 49408, (2, 77))
    with torch.no_grad():
        a, b = ours(ids, output_hidden_states=True), ref(ids, output_hidden_states=True)
    assert len(a.hidden_states) == len(b.hidden_states) == 4
    for x, y in zip(a.hidden_states, b.hidden_states):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-5)
    torch.testing.assert_close(a.last_hidden_state, b.last_hidden_state, rtol=0, atol=1e-5)
    # and back: transformers reads what ours writes
    ours.save_pretrained(tmp_path / "ours")
    again = CLIPTextModel.from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(ids).last_hidden_state, a.last_hidden_state, rtol=0, atol=1e-5)


def test_saved_tokenizer_reads_back_in_both(tmp_path):
    from transformers import CLIPTokenizer
    clip_tokenizer("!").save_pretrained(tmp_path / "tok")
    theirs, ours = CLIPTokenizer.from_pretrained(tmp_path / "tok"), clip.CLIPTokenizer.from_folder(tmp_path / "tok")
    assert theirs.pad_token_id == ours.pad_token_id == 0
    for p in PROMPTS:
        assert theirs(p)["input_ids"] == ours(p)["input_ids"], p


def test_a_folder_that_is_not_a_clip_text_model_is_refused(tmp_path):
    from transformers import CLIPTextConfig, CLIPTextModel
    CLIPTextModel(CLIPTextConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=1)).save_pretrained(tmp_path)
    from safetensors.torch import load_file
    state = load_file(tmp_path / "model.safetensors")
    del state[next(k for k in state if "fc2.weight" in k)]
    with pytest.raises(ValueError, match="missing.*fc2.weight"):
        clip.from_folder(tmp_path, state)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "model_type": "bert"}))
    with pytest.raises(ValueError, match="not a CLIP text model"):
        clip.from_folder(tmp_path, load_file(tmp_path / "model.safetensors"))


def test_generation_never_imports_transformers():
    """The built-in model and both SD layouts: loaded and run in a fresh process."""
    folder, single = saved("sd1")
    code = f"""
import sys
from mezzotint import Pipeline, Request
from mezzotint.cli import default_model
for path in (None, {str(folder)!r}, {str(single)!r}):
    pipe = Pipeline.load(path or default_model(), device="cpu")
    pipe(Request(prompt="a red circle", steps=2, width=64, height=64))
bad = sorted(m for m in sys.modules if m.split(".")[0] in ("transformers", "diffusers"))
assert not bad, bad[:5]
"""
    subprocess.run([sys.executable, "-c", code], check=True, timeout=600)
