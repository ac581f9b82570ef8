"""Tiny pipelines of families steerkit has no adapter for, and tiny modular pipelines.

The generic path (:mod:`steerkit.pipelines.generic`) and the Modular Diffusers integration
(:mod:`steerkit.modular`) are tested on these. Shapes follow each family's diffusers fast tests
(``tests/pipelines/<family>/``), shrunk where the tests allow. Their text encoders are the real
architectures (T5, Gemma-2, GLM-4, Qwen2.5-VL) built from small configs; every family gets the
in-memory character-level tokenizer of :func:`steerkit.testing.tiny_t5_tokenizer` (the pipelines
only call ``tokenizer(...)`` and ``batch_decode``, so the family's own vocabulary does not matter
for steering and no tokenizer files are needed). Every module is put in eval mode.
"""

from __future__ import annotations

import torch

from .testing import _t5_encoder, tiny_stable_diffusion_xl, tiny_t5_tokenizer

__all__ = [
    "tiny_chroma",
    "tiny_cogview4",
    "tiny_hunyuan_image",
    "tiny_ltx",
    "tiny_lumina2",
    "tiny_modular_sdxl",
    "quiet_progress_bars",
]


def _flow_vae(latent_channels: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
        latent_channels=latent_channels, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
        shift_factor=0.0609, scaling_factor=1.5035,
    ).eval()


def tiny_chroma(scheduler=None):
    """A tiny ``ChromaPipeline`` (packed latents, two denoiser calls per step under CFG). Call it at 8×8 or 16×16."""
    from diffusers import ChromaPipeline, ChromaTransformer2DModel, FlowMatchEulerDiscreteScheduler

    torch.manual_seed(0)
    transformer = ChromaTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, axes_dims_rope=[4, 4, 8], approximator_hidden_dim=32, approximator_layers=1,
        approximator_num_channels=16,
    ).eval()
    return ChromaPipeline(
        scheduler=scheduler or FlowMatchEulerDiscreteScheduler(), text_encoder=_t5_encoder(),
        tokenizer=tiny_t5_tokenizer(), transformer=transformer, vae=_flow_vae(latent_channels=1),
        image_encoder=None, feature_extractor=None,
    )


def tiny_lumina2(scheduler=None):
    """A tiny ``Lumina2Pipeline`` (Gemma-2 text encoder; CFG with normalisation, two calls per step). Call it at 32×32."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Lumina2Pipeline, Lumina2Transformer2DModel
    from transformers import Gemma2Config, Gemma2Model

    torch.manual_seed(0)
    transformer = Lumina2Transformer2DModel(
        sample_size=4, patch_size=2, in_channels=4, hidden_size=8, num_layers=2, num_attention_heads=1,
        num_kv_heads=1, multiple_of=16, ffn_dim_multiplier=None, norm_eps=1e-5, scaling_factor=1.0,
        axes_dim_rope=[4, 2, 2], cap_feat_dim=8,
    ).eval()
    torch.manual_seed(0)
    text_encoder = Gemma2Model(Gemma2Config(
        head_dim=4, hidden_size=8, intermediate_size=8, num_attention_heads=2, num_hidden_layers=2,
        num_key_value_heads=2, sliding_window=2, vocab_size=256,
    )).eval()
    return Lumina2Pipeline(
        transformer=transformer, vae=_flow_vae(latent_channels=4),
        scheduler=scheduler or FlowMatchEulerDiscreteScheduler(), text_encoder=text_encoder,
        tokenizer=tiny_t5_tokenizer(),
    )


def tiny_cogview4(scheduler=None):
    """A tiny ``CogView4Pipeline`` (GLM-4 text encoder; re-reads its guidance scale every step). Call it at 16×16."""
    from diffusers import (
        AutoencoderKL,
        CogView4Pipeline,
        CogView4Transformer2DModel,
        FlowMatchEulerDiscreteScheduler,
    )
    from transformers import GlmConfig, GlmForCausalLM

    torch.manual_seed(0)
    transformer = CogView4Transformer2DModel(
        patch_size=2, in_channels=4, num_layers=2, attention_head_dim=4, num_attention_heads=4, out_channels=4,
        text_embed_dim=32, time_embed_dim=8, condition_dim=4,
    ).eval()
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=[8, 8], in_channels=3, out_channels=3, norm_num_groups=4,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"], latent_channels=4, sample_size=128,
    ).eval()
    torch.manual_seed(0)
    text_encoder = GlmForCausalLM(GlmConfig(
        hidden_size=32, intermediate_size=8, num_hidden_layers=2, num_attention_heads=4, head_dim=8, vocab_size=256, pad_token_id=0,
    )).eval()
    scheduler = scheduler or FlowMatchEulerDiscreteScheduler(
        base_shift=0.25, max_shift=0.75, base_image_seq_len=256, use_dynamic_shifting=True, time_shift_type="linear",
    )
    return CogView4Pipeline(tokenizer=tiny_t5_tokenizer(), text_encoder=text_encoder, vae=vae,
                            transformer=transformer, scheduler=scheduler)


def tiny_hunyuan_image(scheduler=None, guider="stock"):
    """A tiny ``HunyuanImagePipeline`` (HunyuanImage 2.1: Qwen2.5-VL + ByT5 encoders, a ``guider`` component).

    ``guider="stock"`` gives it the family's adaptive-projected mix guider (CFG, then APG from step
    2, with a per-sample momentum buffer), as in the diffusers fast test; ``None`` leaves it without
    one (the distilled configuration). Call it at 16×16.
    """
    from diffusers import (
        AutoencoderKLHunyuanImage,
        FlowMatchEulerDiscreteScheduler,
        HunyuanImagePipeline,
        HunyuanImageTransformer2DModel,
    )
    from diffusers.guiders import AdaptiveProjectedMixGuidance
    from diffusers.utils import logging as diffusers_logging
    from transformers import (
        ByT5Tokenizer,
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        T5Config,
        T5EncoderModel,
    )

    torch.manual_seed(0)
    transformer = HunyuanImageTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=4, attention_head_dim=8, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=(1, 1), guidance_embeds=False, text_embed_dim=32,
        text_embed_2_dim=32, rope_axes_dim=(4, 4),
    ).eval()
    torch.manual_seed(0)
    vae = AutoencoderKLHunyuanImage(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64, 64, 64), layers_per_block=1,
        scaling_factor=0.476986, spatial_compression_ratio=8, sample_size=128,
    ).eval()
    torch.manual_seed(0)
    text_encoder = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
        text_config={
            "hidden_size": 32, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
            "num_key_value_heads": 2, "rope_theta": 1000000.0,
            "rope_scaling": {"mrope_section": [2, 2, 4], "rope_type": "default", "type": "default"},
            "vocab_size": 256, "bos_token_id": 1, "eos_token_id": 1, "pad_token_id": 0,
        },
        vision_config={"depth": 2, "hidden_size": 32, "intermediate_size": 32, "num_heads": 2, "out_hidden_size": 32},
        hidden_size=32, vocab_size=256, vision_start_token_id=250, vision_end_token_id=251, vision_token_id=252,
    )).eval()
    torch.manual_seed(0)
    text_encoder_2 = T5EncoderModel(T5Config(
        d_model=32, d_kv=4, d_ff=16, num_layers=2, num_heads=2, relative_attention_num_buckets=8,
        relative_attention_max_distance=32, vocab_size=384, feed_forward_proj="gated-gelu", dense_act_fn="gelu_new",
        is_encoder_decoder=False, use_cache=False, tie_word_embeddings=False,
    )).eval()
    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # the guiders' "experimental feature" warning
    try:
        if guider == "stock":
            torch.manual_seed(0)
            guider, ocr_guider = (AdaptiveProjectedMixGuidance(adaptive_projected_guidance_start_step=2),
                                  AdaptiveProjectedMixGuidance(adaptive_projected_guidance_start_step=3))
        else:
            ocr_guider = guider
    finally:
        diffusers_logging.set_verbosity(level)
    pipe = HunyuanImagePipeline(
        transformer=transformer, vae=vae, scheduler=scheduler or FlowMatchEulerDiscreteScheduler(shift=7.0),
        text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tiny_t5_tokenizer(),
        tokenizer_2=ByT5Tokenizer(), guider=guider, ocr_guider=ocr_guider,
    )
    # The stock pads every prompt to 1000 Qwen tokens (and 128 ByT5 tokens): 16 keep the tiny model tiny.
    pipe.tokenizer_max_length = pipe.tokenizer_2_max_length = 16
    return pipe


def tiny_ltx(scheduler=None):
    """A tiny ``LTXPipeline`` (video; one batched ``[uncond; cond]`` call per step). Call it at 32×32, 9 frames."""
    from diffusers import (
        AutoencoderKLLTXVideo,
        FlowMatchEulerDiscreteScheduler,
        LTXPipeline,
        LTXVideoTransformer3DModel,
    )

    torch.manual_seed(0)
    transformer = LTXVideoTransformer3DModel(
        in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=4, attention_head_dim=8,
        cross_attention_dim=32, num_layers=1, caption_channels=32,
    ).eval()
    torch.manual_seed(0)
    vae = AutoencoderKLLTXVideo(
        in_channels=3, out_channels=3, latent_channels=8, block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8), layers_per_block=(1, 1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1, 1), spatio_temporal_scaling=(True, True, False, False),
        decoder_spatio_temporal_scaling=(True, True, False, False),
        decoder_inject_noise=(False, False, False, False, False), upsample_residual=(False, False, False, False),
        upsample_factor=(1, 1, 1, 1), timestep_conditioning=False, patch_size=1, patch_size_t=1,
        encoder_causal=True, decoder_causal=False,
    ).eval()
    vae.use_framewise_encoding = False
    vae.use_framewise_decoding = False
    return LTXPipeline(transformer=transformer, vae=vae, scheduler=scheduler or FlowMatchEulerDiscreteScheduler(),
                       text_encoder=_t5_encoder(), tokenizer=tiny_t5_tokenizer())


def tiny_modular_sdxl(scheduler=None, guider=None):
    """The modular SDXL pipeline (``StableDiffusionXLAutoBlocks``) on the components of the tiny SDXL.

    ``guider`` defaults to diffusers' CFG at scale 5. Returns ``(modular_pipeline, standard_pipeline)``;
    they share their modules.
    """
    from diffusers import StableDiffusionXLAutoBlocks
    from diffusers.guiders import ClassifierFreeGuidance
    from diffusers.utils import logging as diffusers_logging

    standard = tiny_stable_diffusion_xl(scheduler)
    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # "experimental feature" and component-spec notices
    try:
        modular = StableDiffusionXLAutoBlocks().init_pipeline()
        modular.update_components(**{k: v for k, v in standard.components.items() if v is not None})
        modular.update_components(guider=guider if guider is not None else ClassifierFreeGuidance(guidance_scale=5.0))
    finally:
        diffusers_logging.set_verbosity(level)
    quiet_progress_bars(modular)
    return modular, standard


def quiet_progress_bars(modular) -> None:
    """Turn off the progress bars of every block of a modular pipeline (its own
    ``set_progress_bar_config`` reaches only the top-level blocks, not the loops inside them)."""
    stack = [modular._blocks]
    while stack:
        block = stack.pop()
        if hasattr(block, "set_progress_bar_config"):
            block.set_progress_bar_config(disable=True)
        stack.extend((getattr(block, "sub_blocks", None) or {}).values())
