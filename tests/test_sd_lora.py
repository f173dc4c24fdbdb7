"""LoRA: merged weights match diffusers + PEFT with the same file; kohya and PEFT layouts
agree; undo restores exactly; A1111 prompt tags and the LoRA folder resolver."""
import json

import pytest
import torch
from safetensors.torch import save_file
from test_sd_common import max_err, reference, saved

from mezzotint.sd import apply_lora, find_lora, load_sd, parse_lora_tags
from mezzotint.sd.lora import LoraError

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")
UNET_LAYERS = ["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
               "down_blocks.0.attentions.0.proj_in",  # a 1x1 conv in SD 1.x
               "mid_block.attentions.0.transformer_blocks.0.attn2.to_k",
               "up_blocks.1.resnets.0.conv1",  # 3x3 conv
               "up_blocks.2.attentions.1.transformer_blocks.0.ff.net.2"]
TEXT_LAYERS = ["text_model.encoder.layers.0.self_attn.q_proj", "text_model.encoder.layers.1.mlp.fc1"]


def state(*modules):
    return [{k: v.clone() for k, v in m.state_dict().items()} for m in modules]


def handmade(unet, text_model, rank=3, seed=0):
    """{(component, layer): (down, up)} with random tensors shaped for these models."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for comp, model, layers in (("unet", unet, UNET_LAYERS), ("text_encoder", text_model, TEXT_LAYERS)):
        for name in layers:
            w = model.get_submodule(name if comp == "unet" or hasattr(model, "text_model")
                                    else name.removeprefix("text_model.")).weight
            kernel = tuple(w.shape[2:])
            down = torch.randn(rank, w.shape[1], *kernel, generator=g) * 0.1
            up = torch.randn(w.shape[0], rank, *((1, 1) if kernel else ()), generator=g) * 0.1
            out[(comp, name)] = (down, up)
    return out


def peft_file(path, pairs, alpha):
    tensors = {}
    for (comp, name), (down, up) in pairs.items():
        tensors[f"{comp}.{name}.lora_A.weight"], tensors[f"{comp}.{name}.lora_B.weight"] = down, up
    meta = {f"{c}.{k}": v for c in ("unet", "text_encoder") for k, v in
            {"r": 3, "lora_alpha": alpha, "alpha_pattern": {}, "rank_pattern": {}, "use_dora": False}.items()}
    save_file(tensors, path, metadata={"lora_adapter_metadata": json.dumps(meta)})
    return path


def kohya_file(path, pairs, alpha, names=None):
    tensors = {}
    for (comp, name), (down, up) in pairs.items():
        key = "lora_unet_" if comp == "unet" else "lora_te_"
        key += (names or {}).get(name, name).replace(".", "_")
        tensors.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up,
                        f"{key}.alpha": torch.tensor(float(alpha))})
    save_file(tensors, path)
    return path


def test_kohya_equals_peft_layout_and_undo_is_exact(tmp_path):
    _, single = saved("sd1")
    unet, _, text, _ = load_sd(single)
    before = state(unet, text.model)
    pairs = handmade(unet, text.model)
    peft = peft_file(tmp_path / "peft.safetensors", pairs, alpha=1.5)
    kohya = kohya_file(tmp_path / "kohya.safetensors", pairs, alpha=1.5)
    undo = apply_lora(unet, text, peft, 0.8)
    assert undo.modules == len(pairs)
    via_peft = state(unet, text.model)
    w = unet.get_submodule(UNET_LAYERS[3]).weight  # the 3x3 conv: delta = 0.8 * 1.5/3 * up @ down
    down, up = pairs[("unet", UNET_LAYERS[3])]
    want = before[0][UNET_LAYERS[3] + ".weight"] + 0.4 * (up.flatten(1) @ down.flatten(1)).reshape(w.shape)
    assert max_err(w, want) < 1e-6
    undo()
    assert all(torch.equal(a[k], b[k]) for a, b in zip(before, state(unet, text.model)) for k in a)
    undo()  # a second undo changes nothing
    undo_k = apply_lora(unet, text.model, kohya, 0.8)
    assert all(torch.equal(a[k], b[k]) for a, b in zip(via_peft, state(unet, text.model)) for k in a)
    undo_k()
    assert all(torch.equal(a[k], b[k]) for a, b in zip(before, state(unet, text.model)) for k in a)


def test_original_ldm_names_and_stacking(tmp_path):
    _, single = saved("sd1")
    unet, _, text, _ = load_sd(single)
    before = state(unet)
    pairs = {k: v for k, v in handmade(unet, text.model, seed=1).items() if k[0] == "unet"}
    ldm = {UNET_LAYERS[0]: "input_blocks.1.1.transformer_blocks.0.attn1.to_q",
           UNET_LAYERS[1]: "input_blocks.1.1.proj_in",
           UNET_LAYERS[2]: "middle_block.1.transformer_blocks.0.attn2.to_k",
           UNET_LAYERS[3]: "output_blocks.2.0.in_layers.2",
           UNET_LAYERS[4]: "output_blocks.5.1.transformer_blocks.0.ff.net.2"}
    a = apply_lora(unet, None, kohya_file(tmp_path / "diffusers-names.safetensors", pairs, 3), 1.0)
    merged = state(unet)
    a()
    b = apply_lora(unet, None, kohya_file(tmp_path / "ldm-names.safetensors", pairs, 3, names=ldm), 1.0)
    assert all(torch.equal(merged[0][k], state(unet)[0][k]) for k in merged[0])
    c = apply_lora(unet, None, tmp_path / "diffusers-names.safetensors", -0.5)  # LoRAs stack
    c()
    b()
    assert all(torch.equal(before[0][k], state(unet)[0][k]) for k in before[0])


def test_errors_leave_the_model_unchanged(tmp_path):
    unet, _, text, _ = load_sd(saved("sd1")[1])
    unet2, _, text2, _ = load_sd(saved("sd2")[1])
    before = state(unet, text.model)
    other = peft_file(tmp_path / "sd2.safetensors", handmade(unet2, text2.model), 3)
    with pytest.raises(LoraError, match="another model"):
        apply_lora(unet, text, other)
    bad = {"lora_unet_down_blocks_0_attentions_0_proj_in.hada_w1_a": torch.zeros(2, 2),
           "lora_unet_down_blocks_7_attentions_0_proj_in.lora_down.weight": torch.zeros(2, 2)}
    save_file(bad, tmp_path / "bad.safetensors")
    with pytest.raises(LoraError, match=r"1 keys of no known LoRA layout.*hada_w1_a.*1 keys name no layer.*blocks_7"):
        apply_lora(unet, text, tmp_path / "bad.safetensors")
    half = {"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": torch.zeros(2, 32, 1, 1)}
    save_file(half, tmp_path / "half.safetensors")
    with pytest.raises(LoraError, match="has only"):
        apply_lora(unet, text, tmp_path / "half.safetensors")
    te = peft_file(tmp_path / "te.safetensors", handmade(unet, text.model), 3)
    with pytest.raises(LoraError, match="no text encoder"):
        apply_lora(unet, None, te)
    assert all(torch.equal(a[k], b[k]) for a, b in zip(before, state(unet, text.model)) for k in a)


@pytest.mark.parametrize("variant", ["sd1", "sd2"])
def test_matches_diffusers_load_lora_weights(variant, tmp_path):
    pytest.importorskip("peft")
    import diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    maker = reference(variant)
    torch.manual_seed(5)
    ucfg = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, rank_pattern={"to_v": 2}, alpha_pattern={"to_k": 3},
                      target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1", "ff.net.2"])
    tcfg = LoraConfig(r=2, lora_alpha=3, init_lora_weights=False, target_modules=["q_proj", "v_proj", "out_proj", "fc1"])
    maker.unet.add_adapter(ucfg)
    maker.text_encoder.add_adapter(tcfg)
    diffusers.StableDiffusionPipeline.save_lora_weights(
        tmp_path, unet_lora_layers=get_peft_model_state_dict(maker.unet),
        text_encoder_lora_layers=get_peft_model_state_dict(maker.text_encoder),
        unet_lora_adapter_metadata=ucfg.to_dict(), text_encoder_lora_adapter_metadata=tcfg.to_dict())
    file = tmp_path / "pytorch_lora_weights.safetensors"

    ref = reference(variant)
    ref.load_lora_weights(tmp_path, adapter_name="style")
    ref.set_adapters(["style"], adapter_weights=[0.7])
    unet, _, text, _ = load_sd(saved(variant)[1])
    g = torch.Generator().manual_seed(1)
    x, ctx, t = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g), torch.tensor([20.0, 600.0])
    with torch.no_grad():
        plain = unet(x, t, ctx)
    undo = apply_lora(unet, text, file, 0.7)
    ids = ref.tokenizer(["a photo of a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        ours, want = unet(x, t, ctx), ref.unet(x, t, encoder_hidden_states=ctx).sample
        ours_text, want_text = text.encode(["a photo of a cat"])[0], ref.text_encoder(ids)[0]
    assert max_err(ours, plain) > 0.05  # the LoRA does something
    assert max_err(ours, want) < 1e-4 and max_err(ours_text, want_text) < 1e-4, (max_err(ours, want),
                                                                               max_err(ours_text, want_text))
    undo()
    with torch.no_grad():
        assert torch.equal(unet(x, t, ctx), plain)


def test_parse_lora_tags():
    assert parse_lora_tags("a cat <lora:ink:0.7> on a mat <lora:sub/my style>, night") == \
        ("a cat on a mat, night", [("ink", 0.7), ("sub/my style", 1.0)])
    assert parse_lora_tags("<lora:x:-1.5>") == ("", [("x", -1.5)])
    assert parse_lora_tags("no tags <b>") == ("no tags <b>", [])
    with pytest.raises(ValueError, match="weight must be a number"):
        parse_lora_tags("<lora:x:0.5:0.2>")


def test_find_lora(tmp_path):
    root = tmp_path / "loras"
    for rel in ("ink.safetensors", "ink.pt", "sub/style.safetensors", "Case.safetensors", "a/dup.pt", "b/dup.pt",
                "notes.txt"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"")
    assert find_lora("ink", root) == root / "ink.safetensors"
    assert find_lora("sub/style", root) == find_lora("style", root) == root / "sub/style.safetensors"
    assert find_lora("case", root) == root / "Case.safetensors"
    with pytest.raises(FileNotFoundError, match="ambiguous"):
        find_lora("dup", root)
    with pytest.raises(FileNotFoundError, match="no LoRA 'notes'"):
        find_lora("notes", root)
    with pytest.raises(ValueError, match="bad LoRA name"):
        find_lora("../ink", root)
