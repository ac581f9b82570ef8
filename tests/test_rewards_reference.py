"""Every hub reward against its reference pipeline: preprocessing, model and score formula.

The references, and where they come from:

- OpenAI CLIP / open_clip (``clip``, the ``aesthetic`` encoder, HPSv2's architecture): the
  installed ``open_clip`` package itself (model definition, ``image_transform``,
  ``get_pretrained_cfg``).
- PickScore: transformers' ``CLIPModel`` and ``CLIPImageProcessor`` (its defaults are the
  processor of ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``: short side 224, bicubic, centre crop 224,
  OpenAI mean/std), both backends (``CLIPImageProcessor`` on tensors, ``CLIPImageProcessorPil``).
- HPSv2: its PyPI package ``hpsv2==1.2.0`` pins ``pytest==7.2.0`` and ``protobuf<4`` and cannot be
  installed next to this project's test tools, so its preprocessing is restated below from
  ``hpsv2/src/open_clip/transform.py`` (``ResizeMaxSize``, ``image_transform(...,
  resize_longest_max=True)``) and its score from ``hpsv2/img_score.py`` (``image_features @
  text_features.T`` of the normalised features), both in hpsv2 1.2.0.
- ImageReward: ``image-reward==1.5`` pins ``timm==0.6.13`` (open_clip needs timm ≥ 1.0.17) and
  imports transformers internals that transformers 5 removed, so its pipeline is restated from
  ``ImageReward/ImageReward.py`` (``_transform``, ``ImageReward.score``) and its networks from
  ``ImageReward/models/BLIP/vit.py`` and ``med.py`` of image-reward 1.5, written on the
  checkpoint's original key names.
- The improved aesthetic predictor: restated from ``simple_inference.py`` of
  christophschuhmann/improved-aesthetic-predictor (OpenAI CLIP preprocess, ``normalized`` L2 of the
  embedding, the MLP).

Models are tiny and random (real architectures at toy sizes) or full size on the meta device
(names and shapes). Scores are compared to 1e-5 in float32 on square and non-square images.
Resizing is compared on float images; PIL's 8-bit path differs by its rounding, bounded below.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

open_clip = pytest.importorskip("open_clip")
from PIL import Image  # noqa: E402
from steerkit.rewards import get_reward, tiny  # noqa: E402
from steerkit.rewards.clip import OPENAI_MEAN, OPENAI_STD, clip_architecture  # noqa: E402
from steerkit.rewards.preprocess import ImagePreprocess, resize_images  # noqa: E402
from torchvision.transforms import CenterCrop, Normalize, Resize  # noqa: E402
from torchvision.transforms import functional as TF  # noqa: E402

PROMPTS = ["a photo of a cat", "a red car", "the tree", "dog"]
SIZES = [(32, 32), (48, 48), (40, 64), (70, 45), (32, 43), (20, 27)]  # square, non-square, up and down


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for var in ("STEERKIT_AESTHETIC_CLIP", "STEERKIT_HPSV2_WEIGHTS", "STEERKIT_PICKSCORE_PROCESSOR"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture(scope="module")
def tiny_clip_name(tmp_path_factory):
    return tiny.register_tiny_open_clip(tmp_path_factory.mktemp("open_clip"))


def smooth_images(n, height, width, seed=0):
    """Low-frequency images in [0.2, 0.8]: bicubic resizing keeps them inside [0, 1] (no saturation)."""
    coarse = 0.2 + 0.6 * torch.rand(n, 3, 5, 5, generator=torch.Generator().manual_seed(seed))
    return F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=True)


def uint8_images(n, height, width, seed=0):
    """Random 8-bit images as floats k/255 (PIL holds them exactly)."""
    return torch.randint(0, 256, (n, 3, height, width), generator=torch.Generator().manual_seed(seed)) / 255.0


def to_pil(image):
    return Image.fromarray((image * 255).round().to(torch.uint8).permute(1, 2, 0).numpy())


def tensor_part(compose):
    """The tensor-capable transforms of a torchvision pipeline (without the PIL-only RGB/ToTensor steps)."""
    return [t for t in compose.transforms if isinstance(t, (Resize, CenterCrop, Normalize))]


def apply(transforms, images):
    out = []
    for image in images:
        for transform in transforms:
            image = transform(image)
        out.append(image)
    return torch.stack(out)


# --- resizing --------------------------------------------------------------------------------------


@pytest.mark.parametrize("source, target", [((48, 64), (224, 299)), ((300, 400), (224, 298)), ((512, 512), (224, 224)),
                                            ((37, 91), (101, 224))])
def test_tensor_resize_is_pils_bicubic_filter(source, target):
    """PIL's bicubic filter on float ("F") images, with its support scaled when downsampling."""
    x = torch.rand(1, 3, *source, generator=torch.Generator().manual_seed(0))
    ours = resize_images(x, target)[0]
    pil = np.stack([np.asarray(Image.fromarray(x[0, c].numpy(), mode="F").resize(target[::-1], Image.BICUBIC))
                    for c in range(3)])
    assert np.abs(ours.numpy() - pil).max() < 5e-5  # float32 accumulation; measured ≤ 2.2e-5


def test_pil_8bit_resize_differs_only_by_its_rounding():
    """What PIL does to 8-bit images (the CLIP/ImageReward references): saturated, rounded to 1/255."""
    x = smooth_images(2, 300, 200, seed=3)
    x = (x * 255).round() / 255
    reference = ImagePreprocess(224, (0, 0, 0), (1, 1, 1))
    ours = reference.geometry(x)
    for image, mine in zip(x, ours):
        pil = TF.center_crop(TF.pil_to_tensor(to_pil(image).resize((224, 336), Image.BICUBIC)), [224, 224]) / 255.0
        assert (mine - pil).abs().max() <= 1.5 / 255  # two 8-bit passes of ±0.5/255 each


# --- preprocessing against the references ------------------------------------------------------------


@pytest.mark.parametrize("size", SIZES)
def test_open_clip_preprocessing(size):
    """open_clip's image_transform (OpenAI CLIP's): resize the short side, centre crop (offset rounded)."""
    transform = open_clip.image_transform(32, is_train=False, mean=OPENAI_MEAN, std=OPENAI_STD)
    ours = ImagePreprocess(32, OPENAI_MEAN, OPENAI_STD, resize="shortest", crop="round")
    x = smooth_images(3, *size)
    torch.testing.assert_close(ours(x), apply(tensor_part(transform), x), rtol=0, atol=1e-5)
    # Without a resize (short side already 32) the PIL pipeline is exact on 8-bit images: the crop offset.
    exact = uint8_images(2, 32, size[1] if size[1] >= 32 else 43)
    pil = torch.stack([transform(to_pil(image)) for image in exact])
    torch.testing.assert_close(ours(exact), pil, rtol=0, atol=1e-5)


@pytest.mark.parametrize("size", SIZES)
def test_pickscore_preprocessing_is_clip_image_processors(size):
    """transformers' CLIPImageProcessor (both backends): short side, bicubic; centre crop offset floored."""
    from transformers import CLIPImageProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    settings = {"size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32}}
    ours = ImagePreprocess(32, OPENAI_MEAN, OPENAI_STD, resize="shortest", crop="floor")
    x = smooth_images(3, *size)
    reference = CLIPImageProcessor(**settings)(images=list(x), do_rescale=False, return_tensors="pt")
    torch.testing.assert_close(ours(x), reference["pixel_values"], rtol=0, atol=1e-5)
    exact = uint8_images(2, 32, 43)  # no resize: the 8-bit PIL backend is exact too
    pil = CLIPImageProcessorPil(**settings)(images=[to_pil(i) for i in exact], return_tensors="pt")
    torch.testing.assert_close(ours(exact), pil["pixel_values"], rtol=0, atol=1e-5)


def hpsv2_reference_preprocess(image, size=32):
    """HPSv2 1.2.0 ``image_transform(..., resize_longest_max=True)``: ToTensor, ResizeMaxSize, Normalize.

    ResizeMaxSize: scale = size / max(h, w); if scale != 1: resize to round(dim * scale) (bicubic,
    torchvision on the float tensor) and pad [w//2, h//2, w - w//2, h - h//2] with 0.
    """
    height, width = image.shape[1:]
    scale = size / float(max(height, width))
    if scale != 1.0:
        new = [round(d * scale) for d in (height, width)]
        image = TF.resize(image, new, TF.InterpolationMode.BICUBIC)
        pad_h, pad_w = size - new[0], size - new[1]
        image = TF.pad(image, [pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2], fill=0)
    return TF.normalize(image, OPENAI_MEAN, OPENAI_STD)


@pytest.mark.parametrize("size", SIZES)
def test_hpsv2_preprocessing_is_resize_max_size(size):
    ours = ImagePreprocess(32, OPENAI_MEAN, OPENAI_STD, resize="longest", clamp=False)
    x = torch.rand(3, 3, *size, generator=torch.Generator().manual_seed(1))  # no saturation: any images
    reference = torch.stack([hpsv2_reference_preprocess(image) for image in x])
    torch.testing.assert_close(ours(x), reference, rtol=0, atol=1e-5)


def imagereward_reference_transform(size):
    """image-reward 1.5 ``_transform(n_px)``: Resize(n_px, BICUBIC), CenterCrop(n_px), RGB, ToTensor, Normalize."""
    return [Resize(size, interpolation=TF.InterpolationMode.BICUBIC), CenterCrop(size), Normalize(OPENAI_MEAN, OPENAI_STD)]


# --- scores ------------------------------------------------------------------------------------------


def _images_for(size, seed=0):
    return smooth_images(4, *size, seed=seed)


@pytest.fixture(scope="module")
def clip_files(tiny_clip_name, tmp_path_factory):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = open_clip.create_model(tiny_clip_name, pretrained=None).eval()
    path = tmp_path_factory.mktemp("clip") / "tiny.safetensors"
    save_file(model.state_dict(), str(path))
    return model, path


@pytest.mark.parametrize("size", SIZES[:4])
def test_clip_score_equals_open_clips_pipeline(tiny_clip_name, clip_files, size):
    model, path = clip_files
    reward = get_reward(f"clip:{tiny_clip_name}@{path}")
    transform = open_clip.image_transform(32, is_train=False, mean=OPENAI_MEAN, std=OPENAI_STD)
    x = _images_for(size)
    with torch.no_grad():
        image = F.normalize(model.encode_image(apply(tensor_part(transform), x)), dim=-1)
        text = F.normalize(model.encode_text(open_clip.get_tokenizer(tiny_clip_name)(PROMPTS)), dim=-1)
    torch.testing.assert_close(reward.score(x, PROMPTS), 100 * (image * text).sum(-1), rtol=0, atol=1e-5)


def test_openai_tags_build_quickgelu_at_full_size():
    """The default ``clip`` (ViT-B-32 + openai) and ``clip:ViT-L-14/openai``: QuickGELU, as trained.

    open_clip ≥ 2.29 builds GELU for these names and only warns ("QuickGELU mismatch").
    """
    from open_clip.transformer import QuickGELU

    for spec in ("ViT-B-32/openai", "ViT-L-14/openai", "ViT-L-14-quickgelu/openai"):
        model, config = clip_architecture(spec, device="meta")
        assert config["quick_gelu"] is True
        activations = {type(m) for m in model.modules() if type(m).__name__ in ("GELU", "QuickGELU")}
        assert activations == {QuickGELU}, spec
        with torch.device("meta"):
            reference = open_clip.create_model(spec.split("/")[0], pretrained=None, force_quick_gelu=True, device="meta")
        assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in reference.state_dict().items()}
    model, _ = clip_architecture("ViT-H-14/laion2b_s32b_b79k", device="meta")  # a GELU tag stays GELU
    assert not any(isinstance(m, QuickGELU) for m in model.modules())


def _fake_hub_file(cache, repo, filename, write):
    """Lay ``filename`` out in a Hugging Face cache as a downloaded snapshot of ``repo``."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text("0" * 40)
    snapshot = folder / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True, exist_ok=True)
    write(snapshot / filename)


def test_a_quickgelu_tag_loads_from_the_hub_cache_with_quickgelu(tiny_clip_name, tmp_path, monkeypatch,
                                                                  torch_load_calls):
    import huggingface_hub.constants
    from safetensors.torch import save_file

    torch.manual_seed(1)
    trained = open_clip.create_model(tiny_clip_name, pretrained=None, force_quick_gelu=True).eval()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    _fake_hub_file(tmp_path, "steerkit-test/tiny-openai", "open_clip_model.safetensors",
                   lambda p: save_file(trained.state_dict(), str(p)))
    tag = {"hf_hub": "steerkit-test/tiny-openai/", "quick_gelu": True, "mean": OPENAI_MEAN, "std": OPENAI_STD}
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, tiny_clip_name, {"fakeopenai": tag})
    reward = get_reward(f"clip:{tiny_clip_name}/fakeopenai")
    x = _images_for((40, 64))
    pixels = ImagePreprocess(32, OPENAI_MEAN, OPENAI_STD)(x)
    tokens = open_clip.get_tokenizer(tiny_clip_name)(PROMPTS)
    with torch.no_grad():
        def cosine(model):
            return (F.normalize(model.encode_image(pixels), dim=-1) * F.normalize(model.encode_text(tokens), dim=-1)).sum(-1)

        gelu = open_clip.create_model(tiny_clip_name, pretrained=None).eval()
        gelu.load_state_dict(trained.state_dict())
        expected, wrong = 100 * cosine(trained), 100 * cosine(gelu)
    scores = reward.score(x, PROMPTS)
    torch.testing.assert_close(scores, expected, rtol=0, atol=1e-5)
    assert (scores - wrong).abs().max() > 1e-3  # the activation matters: GELU would score differently

    # The same tag offered only as a pickled .bin (no safetensors): read with weights_only=True.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "bin"))
    _fake_hub_file(tmp_path / "bin", "steerkit-test/tiny-openai", "open_clip_pytorch_model.bin",
                   lambda p: torch.save(trained.state_dict(), p))
    torch_load_calls.clear()
    torch.testing.assert_close(get_reward(f"clip:{tiny_clip_name}/fakeopenai").score(x, PROMPTS), expected,
                               rtol=0, atol=1e-5)
    assert torch_load_calls == [True]


def test_a_tag_published_only_as_a_url_is_refused(tiny_clip_name, monkeypatch):
    """Old open_clip versions list OpenAI's weights as TorchScript archives at a URL: never unpickled."""
    tag = {"url": "https://example.invalid/ViT-B-32.pt", "quick_gelu": True}
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, tiny_clip_name, {"urlonly": tag})
    with pytest.raises(ValueError, match="published only as https://example.invalid/ViT-B-32.pt .*does not unpickle"):
        get_reward(f"clip:{tiny_clip_name}/urlonly")


def test_missing_tag_weights_name_the_repo_and_files():
    from steerkit.rewards import MissingWeightsError

    with pytest.raises(MissingWeightsError, match="open_clip_model.safetensors, open_clip_pytorch_model.bin from the "
                                                  "Hugging Face repo timm/vit_base_patch32_clip_224.openai"):
        get_reward("clip")
    with pytest.raises(ValueError, match="unknown open_clip tag 'nonsense' for ViT-B-32"):
        get_reward("clip:ViT-B-32/nonsense")


def aesthetic_reference(model, head_state, pixels):
    """simple_inference.py: encode_image, L2-normalise the embedding, the MLP (linear layers 0, 2, 4, 6, 7)."""
    with torch.no_grad():
        features = model.encode_image(pixels)
        hidden = features / features.norm(dim=-1, keepdim=True)
        for index in (0, 2, 4, 6, 7):
            hidden = hidden @ head_state[f"layers.{index}.weight"].T + head_state[f"layers.{index}.bias"]
    return hidden.squeeze(-1)


@pytest.mark.parametrize("size", [(48, 48), (70, 45)])
def test_aesthetic_equals_the_predictors_pipeline(tiny_clip_name, clip_files, tmp_path, size):
    model, path = clip_files
    head = tiny.write_aesthetic_head(tmp_path, suffix=".safetensors")
    from safetensors.torch import load_file
    from steerkit.rewards.aesthetic import load_aesthetic

    reward = load_aesthetic(str(head), clip=f"{tiny_clip_name}@{path}")
    x = _images_for(size)
    transform = open_clip.image_transform(32, is_train=False, mean=OPENAI_MEAN, std=OPENAI_STD)
    expected = aesthetic_reference(model, load_file(str(head)), apply(tensor_part(transform), x))
    torch.testing.assert_close(reward.score(x, PROMPTS), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("size", SIZES[:4])
def test_hpsv2_equals_its_pipeline(tiny_clip_name, tmp_path, size):
    from steerkit.rewards.hpsv2 import load_hpsv2

    path = tiny.write_hpsv2(tmp_path)  # {"state_dict": fp16 tensors}, like the published checkpoints
    reward = load_hpsv2(str(path), model_name=tiny_clip_name)
    model = open_clip.create_model(tiny_clip_name, pretrained=None).eval()  # HPSv2: ViT-H-14, GELU
    model.load_state_dict({k: v.float() for k, v in torch.load(path, weights_only=True)["state_dict"].items()})
    x = torch.rand(4, 3, *size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        image = F.normalize(model.encode_image(torch.stack([hpsv2_reference_preprocess(i) for i in x])), dim=-1)
        text = F.normalize(model.encode_text(open_clip.get_tokenizer(tiny_clip_name)(PROMPTS)), dim=-1)
    torch.testing.assert_close(reward.score(x, PROMPTS), 100 * (image @ text.T).diagonal(), rtol=0, atol=1e-5)


def test_hpsv2_architecture_fits_the_published_checkpoint_at_full_size():
    """ViT-H-14 (HPSv2's ``create_model_and_transforms('ViT-H-14', ...)``), GELU, 224 px: names and shapes."""
    model, _ = clip_architecture("ViT-H-14/", device="meta")
    with torch.device("meta"):
        reference = open_clip.create_model("ViT-H-14", pretrained=None, device="meta")
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in reference.state_dict().items()}
    assert model.visual.image_size in (224, (224, 224))
    assert sum(p.numel() for p in model.parameters()) > 9.8e8  # ≈ 986M parameters: 3.9 GB fp32, 2.0 GB fp16


@pytest.mark.parametrize("size", SIZES[:4])
def test_pickscore_equals_its_model_card_pipeline(tmp_path, size):
    from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

    directory = tiny.write_pickscore(tmp_path / "pickscore")
    reward = get_reward(f"pickscore:{directory}")
    model = CLIPModel.from_pretrained(directory, local_files_only=True).eval()
    tokenizer = CLIPTokenizer.from_pretrained(directory, local_files_only=True)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    x = _images_for(size)
    with torch.no_grad():  # the model card: get_*_features, normalise, logit_scale.exp() * text @ image.T
        pixels = processor(images=list(x), do_rescale=False, return_tensors="pt")["pixel_values"]
        image = model.get_image_features(pixel_values=pixels)
        image = getattr(image, "pooler_output", image)
        text = model.get_text_features(**tokenizer(PROMPTS, padding=True, truncation=True, max_length=77,
                                                   return_tensors="pt"))
        text = getattr(text, "pooler_output", text)
        image, text = image / image.norm(dim=-1, keepdim=True), text / text.norm(dim=-1, keepdim=True)
        expected = (model.logit_scale.exp() * text @ image.T).diagonal()
    torch.testing.assert_close(reward.score(x, PROMPTS), expected, rtol=0, atol=1e-5)


# --- ImageReward: BLIP restated from image-reward 1.5 on the checkpoint's own keys ----------------------


def blip_vit(state, x, heads):
    """models/BLIP/vit.py VisionTransformer.forward: patch embed, cls + pos, pre-norm blocks (LayerNorm 1e-6)."""
    p = "blip.visual_encoder."
    weight = state[p + "patch_embed.proj.weight"]
    width, patch = weight.shape[0], weight.shape[-1]
    t = F.conv2d(x, weight, state[p + "patch_embed.proj.bias"], stride=patch).flatten(2).transpose(1, 2)
    t = torch.cat([state[p + "cls_token"].expand(x.shape[0], -1, -1), t], dim=1) + state[p + "pos_embed"]
    B, N, _ = t.shape
    i = 0
    while f"{p}blocks.{i}.norm1.weight" in state:
        b = f"{p}blocks.{i}."
        h = F.layer_norm(t, (width,), state[b + "norm1.weight"], state[b + "norm1.bias"], eps=1e-6)
        q, k, v = F.linear(h, state[b + "attn.qkv.weight"], state[b + "attn.qkv.bias"]).reshape(
            B, N, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
        attention = ((q @ k.transpose(-2, -1)) * (width // heads) ** -0.5).softmax(-1)
        t = t + F.linear((attention @ v).transpose(1, 2).reshape(B, N, width), state[b + "attn.proj.weight"],
                         state[b + "attn.proj.bias"])
        h = F.layer_norm(t, (width,), state[b + "norm2.weight"], state[b + "norm2.bias"], eps=1e-6)
        h = F.linear(F.gelu(F.linear(h, state[b + "mlp.fc1.weight"], state[b + "mlp.fc1.bias"])),
                     state[b + "mlp.fc2.weight"], state[b + "mlp.fc2.bias"])
        t, i = t + h, i + 1
    return F.layer_norm(t, (width,), state[p + "norm.weight"], state[p + "norm.bias"], eps=1e-6)


def med_bert(state, input_ids, attention_mask, image_tokens, heads):
    """models/BLIP/med.py BertModel in mode 'multimodal', is_decoder=False (ImageReward.score).

    Embeddings: LayerNorm(word + absolute position) (no token types); each layer: self-attention
    with the padding mask as (1 − mask)·−10000, cross-attention to every image token, GELU MLP,
    post-norm residuals (LayerNorm 1e-12).
    """
    p = "blip.text_encoder."

    def linear(x, name):
        return F.linear(x, state[name + ".weight"], state[name + ".bias"])

    def norm(x, name):
        return F.layer_norm(x, (x.shape[-1],), state[name + ".weight"], state[name + ".bias"], eps=1e-12)

    def attend(query_input, key_input, mask, name):
        B, L, width = query_input.shape
        d = width // heads

        def split(t):
            return t.view(B, -1, heads, d).transpose(1, 2)

        q, k, v = split(linear(query_input, name + ".self.query")), split(linear(key_input, name + ".self.key")), \
            split(linear(key_input, name + ".self.value"))
        scores = q @ k.transpose(-1, -2) / d ** 0.5 + mask
        context = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, L, width)
        return norm(linear(context, name + ".output.dense") + query_input, name + ".output.LayerNorm")

    length = input_ids.shape[1]
    h = state[p + "embeddings.word_embeddings.weight"][input_ids] + state[p + "embeddings.position_embeddings.weight"][:length]
    h = norm(h, p + "embeddings.LayerNorm")
    self_mask = (1.0 - attention_mask[:, None, None, :].float()) * -10000.0
    i = 0
    while f"{p}encoder.layer.{i}.attention.self.query.weight" in state:
        layer = f"{p}encoder.layer.{i}"
        h = attend(h, h, self_mask, layer + ".attention")
        h = attend(h, image_tokens, torch.zeros(()), layer + ".crossattention")
        h = norm(linear(F.gelu(linear(h, layer + ".intermediate.dense")), layer + ".output.dense") + h,
                 layer + ".output.LayerNorm")
        i += 1
    return h


@pytest.mark.parametrize("size", SIZES[:4])
def test_imagereward_equals_its_pipeline(tmp_path, size):
    from steerkit.rewards.imagereward import load_imagereward

    directory = tiny.write_imagereward(tmp_path / "imagereward")
    state = torch.load(directory / "ImageReward.pt", weights_only=True)
    reward = load_imagereward(str(directory), head_dim=32)  # width 64 → 2 heads
    x = _images_for(size)
    pixels = apply(imagereward_reference_transform(32), x)
    tokens = reward.tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    with torch.no_grad():
        text = med_bert(state, tokens.input_ids, tokens.attention_mask, blip_vit(state, pixels, heads=2), heads=2)
        hidden = text[:, 0].float()
        for index in (0, 2, 4, 6, 7):  # ImageReward.MLP: the Linear layers, dropout off
            hidden = hidden @ state[f"mlp.layers.{index}.weight"].T + state[f"mlp.layers.{index}.bias"]
    expected = (hidden.squeeze(-1) - 0.16717362830052426) / 1.0333394966054072
    torch.testing.assert_close(reward.score(x, PROMPTS), expected, rtol=0, atol=1e-5)


def test_imagereward_fits_blip_large_at_full_size():
    """BLIP_Pretrain(vit='large', image_size=224) + med_config (BERT-base, vocab 30524, cross-attention to
    1024-d image tokens) + MLP(768): every key the published checkpoint has for scoring, at its shape."""
    from steerkit.rewards.imagereward import ImageRewardModel, convert_imagereward_state_dict

    shapes = {"blip.visual_encoder.cls_token": (1, 1, 1024), "blip.visual_encoder.pos_embed": (1, 197, 1024),
              "blip.visual_encoder.patch_embed.proj.weight": (1024, 3, 16, 16),
              "blip.visual_encoder.patch_embed.proj.bias": (1024,),
              "blip.visual_encoder.norm.weight": (1024,), "blip.visual_encoder.norm.bias": (1024,),
              "blip.text_encoder.embeddings.word_embeddings.weight": (30524, 768),
              "blip.text_encoder.embeddings.position_embeddings.weight": (512, 768),
              "blip.text_encoder.embeddings.LayerNorm.weight": (768,), "blip.text_encoder.embeddings.LayerNorm.bias": (768,)}
    for i in range(24):
        b = f"blip.visual_encoder.blocks.{i}."
        shapes.update({b + "norm1.weight": (1024,), b + "norm1.bias": (1024,), b + "attn.qkv.weight": (3072, 1024),
                       b + "attn.qkv.bias": (3072,), b + "attn.proj.weight": (1024, 1024), b + "attn.proj.bias": (1024,),
                       b + "norm2.weight": (1024,), b + "norm2.bias": (1024,), b + "mlp.fc1.weight": (4096, 1024),
                       b + "mlp.fc1.bias": (4096,), b + "mlp.fc2.weight": (1024, 4096), b + "mlp.fc2.bias": (1024,)})
    for i in range(12):
        layer = f"blip.text_encoder.encoder.layer.{i}."
        for block, source in (("attention", 768), ("crossattention", 1024)):
            shapes.update({layer + f"{block}.self.query.weight": (768, 768), layer + f"{block}.self.query.bias": (768,),
                           layer + f"{block}.self.key.weight": (768, source), layer + f"{block}.self.key.bias": (768,),
                           layer + f"{block}.self.value.weight": (768, source),
                           layer + f"{block}.self.value.bias": (768,),
                           layer + f"{block}.output.dense.weight": (768, 768), layer + f"{block}.output.dense.bias": (768,),
                           layer + f"{block}.output.LayerNorm.weight": (768,),
                           layer + f"{block}.output.LayerNorm.bias": (768,)})
        shapes.update({layer + "intermediate.dense.weight": (3072, 768), layer + "intermediate.dense.bias": (3072,),
                       layer + "output.dense.weight": (768, 3072), layer + "output.dense.bias": (768,),
                       layer + "output.LayerNorm.weight": (768,), layer + "output.LayerNorm.bias": (768,)})
    for index, (out, into) in zip((0, 2, 4, 6, 7), ((1024, 768), (128, 1024), (64, 128), (16, 64), (1, 16))):
        shapes.update({f"mlp.layers.{index}.weight": (out, into), f"mlp.layers.{index}.bias": (out,)})
    state = {k: torch.empty(v, device="meta") for k, v in shapes.items()}
    converted = convert_imagereward_state_dict(state)
    assert len(converted) == len(state)  # every scoring key is used
    with torch.device("meta"):
        model = ImageRewardModel.from_state_dict_shapes(converted)
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert own == {k: tuple(v.shape) for k, v in converted.items()}
    assert model.vision.config.num_attention_heads == 16 and model.text.config.num_attention_heads == 12
    assert model.vision.config.image_size == 224
